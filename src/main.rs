fn main() {
    std::process::exit(tensor_wasm::main());
}
