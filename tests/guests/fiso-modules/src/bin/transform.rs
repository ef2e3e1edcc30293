//! Turns an enriched order into the downstream format: `{"id", "amount_cents", "processed_by"}`.

fn main() {
    let mut e = fiso_modules::read();
    let p = &e.payload;
    let cents = (p.get("amount").and_then(|v| v.as_f64()).unwrap_or(0.0) * 100.0).round() as i64;
    e.payload = serde_json::json!({
        "id": p.get("order_id").cloned().unwrap_or_default(),
        "amount_cents": cents,
        "processed_by": p.get("processed_by").cloned().unwrap_or_default(),
    });
    fiso_modules::write(e);
}
