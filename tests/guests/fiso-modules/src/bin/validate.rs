//! Passes an order on unchanged when it has a string `order_id` and a numeric `amount`, adding
//! the header `X-Validated`; otherwise exits 1, naming what is wrong.

fn main() {
    let mut e = fiso_modules::read();
    if !e.payload.get("order_id").is_some_and(|v| v.is_string()) {
        fiso_modules::fail("order_id must be a string");
    }
    if !e.payload.get("amount").is_some_and(|v| v.is_number()) {
        fiso_modules::fail("amount must be a number");
    }
    e.headers.insert("X-Validated".into(), "true".into());
    fiso_modules::write(e);
}
