//! The seed's Go example, in Rust: adds `processed_by` and `timestamp` to the payload object and
//! sets the `X-WASM-Processed` header. `ENRICH_BY` (from the manifest's env) names the processor.

fn main() {
    let mut e = fiso_modules::read();
    let Some(data) = e.payload.as_object_mut() else { fiso_modules::fail("the payload is not an object") };
    let by = std::env::var("ENRICH_BY").unwrap_or_else(|_| "wasm-module".into());
    data.insert("processed_by".into(), by.into());
    data.insert("timestamp".into(), "2024-01-15T10:00:00Z".into());
    e.headers.insert("X-WASM-Processed".into(), "true".into());
    fiso_modules::write(e);
}
