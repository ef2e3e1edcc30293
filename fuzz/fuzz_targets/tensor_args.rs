//! `tensor_create`'s arguments, read from guest memory: any memory and any five i32s give a
//! shape and data within that memory, or a status code. Nothing reads outside `mem`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensor_wasm::wasm::tensor::decode_create_args;

fuzz_target!(|data: &[u8]| {
    if data.len() < 20 {
        return;
    }
    let arg = |i: usize| i32::from_le_bytes([data[i * 4], data[i * 4 + 1], data[i * 4 + 2], data[i * 4 + 3]]);
    let (dtype, shape_ptr, rank, data_ptr, data_len) = (arg(0) & 1, arg(1), arg(2) & 15, arg(3), arg(4));
    let mem = &data[20..];
    match decode_create_args(mem, dtype, shape_ptr, rank, data_ptr, data_len) {
        Ok((shape, values)) => {
            assert_eq!(shape.len(), rank as usize);
            assert_eq!(values.len() * 4, data_len as usize);
            assert!(shape_ptr as u32 as usize + shape.len() * 4 <= mem.len());
        }
        Err((code, message)) => assert!(code < 0 && !message.is_empty(), "{code} {message}"),
    }
});
