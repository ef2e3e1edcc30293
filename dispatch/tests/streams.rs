//! Stream-ordered execution (issue 34, item 1) on the host back-end, through the real rings and
//! worker: kernels of a streaming session hand their handle back when sent, run in order, and a
//! device failure is reported at the session's next wait, naming the failed request.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(dead_code)] // the random source is for the op tests
mod common;

use common::deadline;
use tensor_wasm_dispatch::{
    status, BackendChoice, DeferredFailure, DispatchConfig, Dispatcher, Done, Op, Session, STREAMED,
};

fn host() -> Arc<Dispatcher> {
    Dispatcher::start(DispatchConfig { backend: BackendChoice::Host, ..Default::default() }).unwrap()
}

fn upload(s: &mut Session, values: Vec<f32>) -> i32 {
    let call = s.upload(&[values.len() as u32], values).unwrap();
    let Ok(Done::Tensor(h)) = s.call_blocking(call, deadline()) else { panic!("upload") };
    h
}

fn read(s: &mut Session, h: i32) -> Result<Vec<f32>, i32> {
    let call = s.download(h).unwrap();
    match s.call_blocking(call, deadline())? {
        Done::Data(v) => Ok(v),
        Done::Tensor(_) => panic!("a download gives data"),
    }
}

/// Makes a call with `make` and sends it streamed, retrying a full ring for up to a second.
fn stream(s: &mut Session, make: impl FnOnce(&mut Session) -> Result<tensor_wasm_dispatch::Call, i32>) -> i32 {
    let mut call = make(s).unwrap();
    assert!(call.is_streamed());
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        match s.try_stream(call) {
            Ok(h) => return h,
            Err(c) if Instant::now() < until => call = c,
            Err(_) => panic!("the ring stayed full"),
        }
    }
}

#[test]
fn a_chain_of_streamed_adds_runs_in_order_and_one_read_sees_it_all() {
    let d = host();
    let mut s = Session::new(d.clone(), 0, 1);
    s.set_streaming(true);
    let y = upload(&mut s, vec![1.0; 1024]);
    let mut x = upload(&mut s, vec![0.5; 1024]);
    // More than the ring holds (256): the worker runs them while the chain is being sent.
    for _ in 0..2000 {
        let next = stream(&mut s, |s| s.kernel(Op::Add, x, y, 0.0));
        s.free(x).unwrap();
        x = next;
    }
    assert!(s.unsynced());
    let general =
        stream(&mut s, |s| s.op(Op::Maximum, &tensor_wasm_dispatch::Args { a: x, b: y, ..Default::default() }));
    assert_eq!(read(&mut s, x).unwrap(), vec![2000.5; 1024]);
    assert_eq!(read(&mut s, general).unwrap(), vec![2000.5; 1024]);
    assert!(!s.unsynced(), "a read waits for everything before it");
    let sync = s.sync().unwrap();
    assert!(matches!(s.call_blocking(sync, deadline()), Ok(Done::Data(_))));
    assert_eq!(s.failure(), None);
    drop(s);
    d.shutdown();
}

#[test]
fn a_device_failure_is_reported_at_the_next_wait_and_later_kernels_are_skipped() {
    let d = host();
    let mut s = Session::new(d.clone(), 0, 1);
    s.set_streaming(true);
    let x = upload(&mut s, vec![2.0; 4]);
    let fine = stream(&mut s, |s| s.kernel(Op::Add, x, x, 0.0));
    // A request the host would never send (its operands name no tensor), as the device sees a
    // failure: the session's 77th.
    let mut forged = d.request(0, Op::Add, s.id());
    (forged.a, forged.b, forged.out, forged.dims, forged.ticket, forged.seq) =
        (u64::MAX - 1, u64::MAX - 2, u64::MAX - 3, [4, 0, 0], STREAMED, 77);
    d.try_submit(0, s.place(), forged).unwrap();
    let after = stream(&mut s, |s| s.kernel(Op::Add, x, x, 0.0));
    // The next wait, whatever it is, reports the failure and which request it was; by then the
    // worker has run (or skipped) everything before it.
    assert_eq!(read(&mut s, fine), Err(status::BAD_HANDLE));
    let used_before = d.devices[0].memory_used();
    assert_eq!(s.failure(), Some(DeferredFailure { seq: 77, op: Some(Op::Add), status: status::BAD_HANDLE }));
    let sync = s.sync().unwrap();
    assert_eq!(s.call_blocking(sync, deadline()).err(), Some(status::BAD_HANDLE));
    assert_eq!(read(&mut s, after), Err(status::BAD_HANDLE), "skipped, never made");
    assert_eq!(d.devices[0].memory_used(), used_before, "nothing made after the failure");
    drop(s);
    // Another session on the same device and shard starts clean.
    let mut t = Session::new(d.clone(), 0, 1);
    t.set_streaming(true);
    let z = upload(&mut t, vec![3.0; 4]);
    let doubled = stream(&mut t, |s| s.kernel(Op::Add, z, z, 0.0));
    assert_eq!(read(&mut t, doubled).unwrap(), vec![6.0; 4]);
    drop(t);
    d.shutdown();
}

#[test]
fn a_streamed_call_dropped_unsent_returns_its_quota_and_frees_its_descriptor() {
    let d = Dispatcher::start(DispatchConfig { backend: BackendChoice::Host, ring_depth: 1, ..Default::default() })
        .unwrap();
    let mut s = Session::new(d.clone(), 0, 1);
    s.set_streaming(true);
    let x = upload(&mut s, vec![1.0; 8]);
    let args = tensor_wasm_dispatch::Args { a: x, b: x, ..Default::default() };
    let quota = d.quotas.tenant(1);
    let held = quota.used();
    let call = s.op(Op::Maximum, &args).unwrap();
    assert!(call.is_streamed());
    assert_eq!(quota.used(), held + 32, "reserved when prepared");
    s.abort(call);
    assert_eq!(quota.used(), held, "returned when given up");
    drop(s);
    d.shutdown();
}
