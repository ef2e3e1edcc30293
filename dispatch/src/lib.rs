//! Kernel dispatch for TensorWasm: bounded lock-free rings from every shard to one worker thread
//! per device, and a completion ring back to each shard.
//!
//! ```text
//!  shard 0 ─ring─┐                 ┌─ring─▶ shard 0's port ─▶ waiting guest
//!  shard 1 ─ring─┼─▶ device worker ┤
//!  shard N ─ring─┘   (its back-end) └─ring─▶ shard N's port
//! ```
//!
//! A shard builds requests through a [`Session`] (one per invocation), pushes them with
//! [`Session::try_send`], and awaits [`TicketWait`]. The shard runs [`Dispatcher::poller`] as a task,
//! which routes completions to the waiting guests. Nothing here depends on an executor.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use tensor_wasm_dispatch::{BackendChoice, DispatchConfig, Dispatcher, Done, Op, Session};
//!
//! let dispatcher = Dispatcher::start(DispatchConfig { backend: BackendChoice::Host, ..Default::default() }).unwrap();
//! let mut session = Session::new(dispatcher.clone(), 0, 7);
//! let deadline = Instant::now() + Duration::from_secs(5);
//! let call = session.upload(&[2], vec![1.0, -2.0]).unwrap();
//! let Done::Tensor(x) = session.call_blocking(call, deadline).unwrap() else { unreachable!() };
//! let call = session.kernel(Op::Relu, x, 0, 0.0).unwrap();
//! let Done::Tensor(y) = session.call_blocking(call, deadline).unwrap() else { unreachable!() };
//! let call = session.download(y).unwrap();
//! let Done::Data(out) = session.call_blocking(call, deadline).unwrap() else { unreachable!() };
//! assert_eq!(out, vec![1.0, 0.0]);
//! drop(session);
//! dispatcher.shutdown();
//! ```

pub mod backend;
mod dispatcher;
mod port;
pub mod probe;
pub mod quota;
pub mod record;
mod session;
pub mod shape;
pub mod weights;
mod worker;

pub use backend::BackendKind;
pub use dispatcher::{BackendChoice, Device, DispatchConfig, DispatchError, Dispatcher, OnWorkerStart, Poller};
pub use port::{ShardPort, TicketWait, STREAMED};
pub use record::{status, Completion, DType, Desc, Op, Request, MAX_RANK};
pub use session::{Args, Call, DeferredFailure, Done, Pending, Session, TensorInfo};
pub use weights::{Claim, LoadGuard, Resident, Weight, Weights};
