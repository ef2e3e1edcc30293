//! Bulk-memory instructions that a deadline can stop.
//!
//! wasmtime checks the epoch (our deadlines and guest slices) at function entries and loop
//! headers, and runs `memory.fill`, `memory.copy` and `memory.init` each as one libcall that
//! nothing interrupts: one `memory.fill` over 1 GiB of fresh memory held its shard 0.59 s,
//! whatever the invocation's deadline (perf/HOSTILE.md, "The longest single instruction"). Rust
//! and C compilers emit these instructions for every `memcpy` and `memset` of a size they do not
//! know, so no guest can be asked to avoid them.
//!
//! So before a module is compiled, each of them on memory 0 becomes a call of a function appended
//! to the module, which does the same work in chunks of [`CHUNK_BYTES`] inside a loop: an epoch
//! check runs between any two chunks. The helpers keep the instructions' meaning exactly:
//!
//! - an access out of bounds traps before anything is written: the helper checks the bounds first
//!   and, when they fail, runs the original instruction over the whole range, which traps as it
//!   would have;
//! - overlapping copies go forwards when the destination is below the source and backwards
//!   otherwise, so no chunk reads bytes an earlier chunk wrote;
//! - up to `CHUNK_BYTES` (the common case of a small `memcpy`) the helper runs the instruction
//!   as it was, behind one comparison and a call.
//!
//! Function indices of the module's own functions do not change (the helpers come after them),
//! and a module without these instructions is compiled as it came. Only memory 0 exists here
//! (the pool allows one memory per module) and memory64 is off, so every helper works on i32
//! addresses.

use std::borrow::Cow;
use std::collections::BTreeMap;

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{CodeSection, Function, FunctionSection, Instruction, TypeSection, ValType};
use wasmparser::{Operator, Payload, TypeRef};

/// The most bytes one uninterrupted step writes: 64 KiB is about 40 µs on fresh pages (0.58 ms
/// per MiB, perf/HOSTILE.md), well inside a 100 µs guest slice, while the loop's own cost (a call,
/// a comparison and an epoch check per chunk) stays under a percent of a chunk's work.
pub const CHUNK_BYTES: u32 = 64 * 1024;

/// What is compiled of a tenant's `wasm`: validated as it came (so that its errors are the
/// validator's), then with its bulk-memory instructions made interruptible. Every compile goes
/// through here, in the server (`module::check_module`) and in the compile child (`compile`).
pub fn prepare<'a>(engine: &wasmtime::Engine, wasm: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    wasmtime::Module::validate(engine, wasm).map_err(|e| format!("{e:#}"))?;
    make_interruptible(wasm)
}

/// `wasm` with every bulk-memory instruction on memory 0 made interruptible, or `wasm` itself when
/// it has none. `wasm` must already be valid (`Module::validate`): an invalid module is refused
/// with the validator's message, not with this rewrite's.
pub fn make_interruptible(wasm: &[u8]) -> Result<Cow<'_, [u8]>, String> {
    let plan = Plan::read(wasm).map_err(|e| format!("cannot read the module: {e}"))?;
    if !plan.needs_helpers() {
        return Ok(Cow::Borrowed(wasm));
    }
    let mut rewriter = Rewriter::new(plan);
    let mut module = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut module, wasmparser::Parser::new(0), wasm)
        .map_err(|e| format!("cannot rewrite the module's bulk-memory instructions: {e}"))?;
    Ok(Cow::Owned(module.finish()))
}

/// What the rewrite needs to know before it writes anything.
#[derive(Default)]
struct Plan {
    imported_functions: u32,
    defined_functions: u32,
    /// Types in the type section, counting each member of a recursion group.
    types: u32,
    /// log2 of memory 0's page size.
    page_bits: u32,
    /// Each data segment's length, by index: `memory.init` checks its source range against it.
    data_lengths: Vec<u32>,
    fill: bool,
    copy: bool,
    /// The data segments that `memory.init` reads, each of which gets a helper of its own.
    inits: Vec<u32>,
}

impl Plan {
    fn read(wasm: &[u8]) -> wasmparser::Result<Plan> {
        let mut plan = Plan { page_bits: 16, ..Plan::default() };
        let mut inits = std::collections::BTreeSet::new();
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            match payload? {
                Payload::TypeSection(section) => {
                    for group in section {
                        plan.types += group?.types().count() as u32;
                    }
                }
                Payload::ImportSection(section) => {
                    for import in section.into_imports() {
                        match import?.ty {
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => plan.imported_functions += 1,
                            TypeRef::Memory(memory) => plan.memory(memory),
                            _ => {}
                        }
                    }
                }
                Payload::MemorySection(section) => {
                    for memory in section {
                        plan.memory(memory?);
                    }
                }
                Payload::FunctionSection(section) => plan.defined_functions = section.count(),
                Payload::DataSection(section) => {
                    for data in section {
                        plan.data_lengths.push(data?.data.len() as u32);
                    }
                }
                Payload::CodeSectionEntry(body) => {
                    let mut reader = body.get_operators_reader()?;
                    while !reader.eof() {
                        match reader.read()? {
                            Operator::MemoryFill { mem: 0 } => plan.fill = true,
                            Operator::MemoryCopy { dst_mem: 0, src_mem: 0 } => plan.copy = true,
                            Operator::MemoryInit { data_index, mem: 0 } => {
                                inits.insert(data_index);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        plan.inits = inits.into_iter().collect();
        Ok(plan)
    }

    /// Notes memory 0's page size; later memories are refused by the pool.
    fn memory(&mut self, memory: wasmparser::MemoryType) {
        if let Some(bits) = memory.page_size_log2 {
            self.page_bits = bits;
        }
        // memory64 is off in the engine (`engine::base_config`), so the validator refused it.
        debug_assert!(!memory.memory64, "the validator lets no 64-bit memory through");
    }

    fn needs_helpers(&self) -> bool {
        self.fill || self.copy || !self.inits.is_empty()
    }
}

/// The helpers, in the order they are appended.
#[derive(Clone, Copy)]
enum Helper {
    Fill,
    Copy,
    Init { data_index: u32, data_length: u32 },
}

struct Rewriter {
    plan: Plan,
    helpers: Vec<Helper>,
    /// Function index of each helper, where the rewrite calls it.
    fill: Option<u32>,
    copy: Option<u32>,
    init: BTreeMap<u32, u32>,
}

impl Rewriter {
    fn new(plan: Plan) -> Self {
        let mut helpers = Vec::new();
        if plan.fill {
            helpers.push(Helper::Fill);
        }
        if plan.copy {
            helpers.push(Helper::Copy);
        }
        for &data_index in &plan.inits {
            // An index past the data section fails validation, which ran before.
            let data_length = plan.data_lengths.get(data_index as usize).copied().unwrap_or(0);
            helpers.push(Helper::Init { data_index, data_length });
        }
        let first = plan.imported_functions + plan.defined_functions;
        let (mut fill, mut copy, mut init) = (None, None, BTreeMap::new());
        for (k, helper) in helpers.iter().enumerate() {
            let index = first + k as u32;
            match *helper {
                Helper::Fill => fill = Some(index),
                Helper::Copy => copy = Some(index),
                Helper::Init { data_index, .. } => {
                    init.insert(data_index, index);
                }
            }
        }
        Rewriter { plan, helpers, fill, copy, init }
    }

    /// The type every helper has: `(i32 destination, i32 value or source, i32 length) -> ()`,
    /// the operands of the instruction it stands for. Appended after the module's own types.
    fn helper_type(&self) -> u32 {
        self.plan.types
    }

    fn body(&self, helper: Helper) -> Function {
        let page_bits = self.plan.page_bits;
        match helper {
            Helper::Fill => chunked(Instruction::MemoryFill(0), Ranges::Fill, page_bits),
            Helper::Copy => chunked(Instruction::MemoryCopy { src_mem: 0, dst_mem: 0 }, Ranges::Copy, page_bits),
            Helper::Init { data_index, data_length } => {
                chunked(Instruction::MemoryInit { mem: 0, data_index }, Ranges::Init { data_length }, page_bits)
            }
        }
    }
}

impl Reencode for Rewriter {
    type Error = std::convert::Infallible;

    fn instruction<'a>(&mut self, op: Operator<'a>) -> Result<Instruction<'a>, reencode::Error> {
        let helper = match op {
            Operator::MemoryFill { mem: 0 } => self.fill,
            Operator::MemoryCopy { dst_mem: 0, src_mem: 0 } => self.copy,
            Operator::MemoryInit { data_index, mem: 0 } => self.init.get(&data_index).copied(),
            _ => None,
        };
        match helper {
            Some(index) => Ok(Instruction::Call(index)),
            None => reencode::utils::instruction(self, op),
        }
    }

    fn parse_type_section(
        &mut self,
        types: &mut TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Result<(), reencode::Error> {
        reencode::utils::parse_type_section(self, types, section)?;
        types.ty().function([ValType::I32; 3], std::iter::empty::<ValType>());
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> Result<(), reencode::Error> {
        reencode::utils::parse_function_section(self, functions, section)?;
        for _ in &self.helpers {
            functions.function(self.helper_type());
        }
        Ok(())
    }

    fn parse_code_section(
        &mut self,
        code: &mut CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> Result<(), reencode::Error> {
        reencode::utils::parse_code_section(self, code, section)?;
        for &helper in &self.helpers {
            code.function(&self.body(helper));
        }
        Ok(())
    }
}

/// Which ranges an instruction touches, given its operands `(d, x, n)`.
#[derive(Clone, Copy)]
enum Ranges {
    /// `[d, d + n)` in memory.
    Fill,
    /// `[d, d + n)` and `[x, x + n)` in memory.
    Copy,
    /// `[d, d + n)` in memory and `[x, x + n)` in a segment of `data_length` bytes.
    Init { data_length: u32 },
}

const DEST: u32 = 0;
const SECOND: u32 = 1;
const LEN: u32 = 2;

/// A helper that runs `op` over `(d, x, n)` in chunks of at most [`CHUNK_BYTES`]: `op` itself
/// when `n` fits in one chunk or a range is out of bounds (so it traps before writing, as it
/// would have), else a loop, backwards for a copy whose destination is above its source.
fn chunked(op: Instruction<'static>, ranges: Ranges, page_bits: u32) -> Function {
    use Instruction as I;
    let mut f = Function::new(std::iter::empty::<(u32, ValType)>());
    let whole = |f: &mut Function| {
        f.instruction(&I::LocalGet(DEST)).instruction(&I::LocalGet(SECOND)).instruction(&I::LocalGet(LEN));
        f.instruction(&op).instruction(&I::Return);
    };
    // One chunk or less, or out of bounds: the instruction as it was.
    f.instruction(&I::LocalGet(LEN)).instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(&I::I32LeU);
    out_of_bounds(&mut f, DEST, Bound::Memory { page_bits });
    f.instruction(&I::I32Or);
    match ranges {
        Ranges::Fill => {}
        Ranges::Copy => {
            out_of_bounds(&mut f, SECOND, Bound::Memory { page_bits });
            f.instruction(&I::I32Or);
        }
        Ranges::Init { data_length } => {
            out_of_bounds(&mut f, SECOND, Bound::Segment { length: data_length });
            f.instruction(&I::I32Or);
        }
    }
    f.instruction(&I::If(wasm_encoder::BlockType::Empty));
    whole(&mut f);
    f.instruction(&I::End);
    let forwards = |f: &mut Function| {
        // n > CHUNK here. Each turn does one chunk and moves both addresses on; the rest, at most
        // one chunk and never empty, goes after the loop.
        f.instruction(&I::Loop(wasm_encoder::BlockType::Empty));
        step_op(f, &op, None);
        advance(f, DEST);
        if !matches!(ranges, Ranges::Fill) {
            advance(f, SECOND);
        }
        shrink_and_loop(f);
        f.instruction(&I::End);
        whole(f);
    };
    match ranges {
        Ranges::Copy => {
            // Destination above the source: the highest chunk first, so that no chunk's source
            // was already overwritten by an earlier one.
            f.instruction(&I::LocalGet(DEST)).instruction(&I::LocalGet(SECOND)).instruction(&I::I32GtU);
            f.instruction(&I::If(wasm_encoder::BlockType::Empty));
            f.instruction(&I::Loop(wasm_encoder::BlockType::Empty));
            f.instruction(&I::LocalGet(LEN)).instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(&I::I32Sub);
            f.instruction(&I::LocalSet(LEN));
            step_op(&mut f, &op, Some(LEN));
            f.instruction(&I::LocalGet(LEN)).instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(&I::I32GtU);
            f.instruction(&I::BrIf(0));
            f.instruction(&I::End);
            whole(&mut f);
            f.instruction(&I::End);
            forwards(&mut f);
        }
        Ranges::Fill | Ranges::Init { .. } => forwards(&mut f),
    }
    f.instruction(&I::End);
    f
}

/// Where an operand's range must end.
enum Bound {
    /// Within memory 0, whose size is read at the call (it may have grown).
    Memory { page_bits: u32 },
    /// Within a data segment of `length` bytes (a dropped one is shorter; then the first chunk
    /// traps before it writes, as the whole instruction would have).
    Segment { length: u32 },
}

/// Pushes whether `[local, local + n)` ends past `bound`, computed in 64 bits so that nothing
/// wraps.
fn out_of_bounds(f: &mut Function, local: u32, bound: Bound) {
    use Instruction as I;
    f.instruction(&I::LocalGet(local)).instruction(&I::I64ExtendI32U);
    f.instruction(&I::LocalGet(LEN)).instruction(&I::I64ExtendI32U).instruction(&I::I64Add);
    match bound {
        Bound::Memory { page_bits } => {
            f.instruction(&I::MemorySize(0)).instruction(&I::I64ExtendI32U);
            f.instruction(&I::I64Const(i64::from(page_bits))).instruction(&I::I64Shl);
        }
        Bound::Segment { length } => {
            f.instruction(&I::I64Const(i64::from(length)));
        }
    }
    f.instruction(&I::I64GtU);
}

/// `op` over one chunk at `(d + offset, x + offset)`, where `offset` is the local `at` or zero.
fn step_op(f: &mut Function, op: &Instruction<'static>, at: Option<u32>) {
    use Instruction as I;
    for local in [DEST, SECOND] {
        f.instruction(&I::LocalGet(local));
        // A fill's value is not an address.
        if let (Some(at), true) = (at, local == DEST || !matches!(op, I::MemoryFill(_))) {
            f.instruction(&I::LocalGet(at)).instruction(&I::I32Add);
        }
    }
    f.instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(op);
}

/// `local += CHUNK_BYTES`.
fn advance(f: &mut Function, local: u32) {
    use Instruction as I;
    f.instruction(&I::LocalGet(local)).instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(&I::I32Add);
    f.instruction(&I::LocalSet(local));
}

/// `n -= CHUNK_BYTES`, and round again while more than a chunk is left.
fn shrink_and_loop(f: &mut Function) {
    use Instruction as I;
    f.instruction(&I::LocalGet(LEN)).instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(&I::I32Sub);
    f.instruction(&I::LocalTee(LEN)).instruction(&I::I32Const(CHUNK_BYTES as i32)).instruction(&I::I32GtU);
    f.instruction(&I::BrIf(0));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use wasmtime::{Engine, Instance, Module, Store, UpdateDeadline};

    use super::*;

    const PAGES: u32 = 4;
    const SEGMENT_BYTES: usize = 3 * CHUNK_BYTES as usize + 123;

    /// Exports each instruction over caller-chosen operands, a passive segment for `memory.init`,
    /// and `drop` for that segment.
    fn guest() -> Vec<u8> {
        let segment: String = (0..SEGMENT_BYTES).map(|i| format!("\\{:02x}", (i * 7 + 3) as u8)).collect();
        wat::parse_str(format!(
            r#"(module
  (memory (export "memory") {PAGES})
  (data $seg "{segment}")
  (func (export "fill") (param i32 i32 i32) (memory.fill (local.get 0) (local.get 1) (local.get 2)))
  (func (export "copy") (param i32 i32 i32) (memory.copy (local.get 0) (local.get 1) (local.get 2)))
  (func (export "init") (param i32 i32 i32) (memory.init $seg (local.get 0) (local.get 1) (local.get 2)))
  (func (export "drop") (data.drop $seg)))"#
        ))
        .unwrap()
    }

    /// Runs `op(d, x, n)` (after `drop` when `dropped`) on a fresh instance of `wasm` whose memory
    /// holds a pattern: whether it trapped, and the memory afterwards.
    fn run(engine: &Engine, wasm: &[u8], op: &str, (d, x, n): (u32, u32, u32), dropped: bool) -> (bool, Vec<u8>) {
        let module = Module::new(engine, wasm).unwrap();
        let mut store = Store::new(engine, ());
        let instance = Instance::new(&mut store, &module, &[]).unwrap();
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        for (i, byte) in memory.data_mut(&mut store).iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        if dropped {
            instance.get_typed_func::<(), ()>(&mut store, "drop").unwrap().call(&mut store, ()).unwrap();
        }
        let f = instance.get_typed_func::<(u32, u32, u32), ()>(&mut store, op).unwrap();
        let trapped = f.call(&mut store, (d, x, n)).is_err();
        (trapped, memory.data(&store).to_vec())
    }

    fn operand() -> impl Strategy<Value = u32> {
        let memory = PAGES * 65536;
        prop_oneof![
            0..memory + 2 * CHUNK_BYTES,
            Just(0),
            (0..3u32).prop_map(move |k| memory - k),
            (0..4u32).prop_map(|k| k * CHUNK_BYTES),
            any::<u32>(),
        ]
    }

    fn length() -> impl Strategy<Value = u32> {
        prop_oneof![
            0..PAGES * 65536 + 1,
            (0..5u32, -1i64..=1).prop_map(|(k, e)| (i64::from(k * CHUNK_BYTES) + e).max(0) as u32),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The rewritten module does what the original does, byte for byte, and traps where it
        /// traps without writing anything first: overlapping copies both ways, ranges that end
        /// exactly at the memory's or the segment's end or one past it, lengths around chunk
        /// boundaries, and addresses that would wrap in 32 bits.
        #[test]
        fn the_rewrite_changes_nothing_but_where_a_deadline_can_stop(
            op in prop_oneof![Just("fill"), Just("copy"), Just("init")],
            d in operand(), x in operand(), n in length(), dropped in any::<bool>(),
        ) {
            let engine = Engine::default();
            let original = guest();
            let rewritten = make_interruptible(&original).unwrap();
            prop_assert!(matches!(rewritten, Cow::Owned(_)));
            let x = if op == "fill" { x & 0xff } else { x };
            let before = run(&engine, &original, op, (d, x, n), dropped);
            let after = run(&engine, &rewritten, op, (d, x, n), dropped);
            prop_assert_eq!(before.0, after.0, "trapped");
            prop_assert!(before.1 == after.1, "the memories differ after {}({}, {}, {})", op, d, x, n);
        }
    }

    /// How many times the deadline is checked while `op` runs over all of memory: the epoch
    /// callback is asked at every check, since each sets the deadline to the epoch it is at.
    fn deadline_checks(wasm: &[u8], op: &str) -> u32 {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).unwrap();
        let module = Module::new(&engine, wasm).unwrap();
        let mut store = Store::new(&engine, 0u32);
        store.set_epoch_deadline(0);
        store.epoch_deadline_callback(|mut ctx| {
            *ctx.data_mut() += 1;
            Ok(UpdateDeadline::Continue(0))
        });
        let instance = Instance::new(&mut store, &module, &[]).unwrap();
        let f = instance.get_typed_func::<(u32, u32, u32), ()>(&mut store, op).unwrap();
        let operands = match op {
            "copy" => (CHUNK_BYTES / 2, 0, PAGES * 65536 - CHUNK_BYTES / 2),
            "init" => (0, 0, SEGMENT_BYTES as u32),
            _ => (0, 1, PAGES * 65536),
        };
        f.call(&mut store, operands).unwrap();
        *store.data()
    }

    #[test]
    fn a_deadline_is_checked_between_any_two_chunks() {
        let original = guest();
        let rewritten = make_interruptible(&original).unwrap();
        for (op, bytes) in [("fill", PAGES * 65536), ("copy", PAGES * 65536), ("init", SEGMENT_BYTES as u32)] {
            let chunks = bytes.div_ceil(CHUNK_BYTES);
            let (before, after) = (deadline_checks(&original, op), deadline_checks(&rewritten, op));
            // The original is checked on entering the exported function, never inside the
            // instruction; the rewrite at least once between any two chunks besides.
            assert!(after >= before + chunks - 1, "{op}: {before} checks before, {after} after, {chunks} chunks");
        }
    }

    #[test]
    fn a_module_without_bulk_memory_instructions_is_compiled_as_it_came() {
        let wasm =
            wat::parse_str(r#"(module (memory 1) (func (export "_start") (i32.store (i32.const 0) (i32.const 1))))"#)
                .unwrap();
        assert!(matches!(make_interruptible(&wasm).unwrap(), Cow::Borrowed(_)));
    }

    /// Helpers go after the module's own functions and types, so that imports, exports, tables,
    /// `ref.func` and the start function keep their indices; a name section still names them.
    #[test]
    fn the_modules_own_indices_do_not_move() {
        let wasm = wat::parse_str(
            r#"(module
  (type $unused (func (param f64)))
  (rec (type $a (struct)) (type $b (struct (field i32))))
  (import "env" "imported" (func $imported (param i32)))
  (memory (export "memory") 4)
  (table 2 funcref)
  (elem (i32.const 0) func $second $first)
  (global $g (export "g") (mut i32) (i32.const 0))
  (func $first (export "first") (result i32)
    (memory.fill (i32.const 0) (i32.const 9) (i32.const 200000))
    (call_indirect (result i32) (i32.const 0)))
  (func $second (result i32) (i32.const 42))
  (func $start (global.set $g (i32.const 7)))
  (start $start))"#,
        )
        .unwrap();
        let rewritten = make_interruptible(&wasm).unwrap();
        let engine = Engine::default();
        let module = Module::new(&engine, &rewritten).unwrap();
        let exports: Vec<_> = module.exports().map(|e| e.name().to_string()).collect();
        assert_eq!(exports, ["memory", "g", "first"]);
        let mut store = Store::new(&engine, ());
        let imported = wasmtime::Func::wrap(&mut store, |_: i32| {});
        let instance = Instance::new(&mut store, &module, &[imported.into()]).unwrap();
        let g = instance.get_global(&mut store, "g").unwrap();
        assert_eq!(g.get(&mut store).i32(), Some(7), "the start function ran");
        let first = instance.get_typed_func::<(), i32>(&mut store, "first").unwrap();
        assert_eq!(first.call(&mut store, ()).unwrap(), 42, "the table still points at $second");
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        let data = memory.data(&store);
        assert!(data[..200_000].iter().all(|&b| b == 9) && data[200_000] == 0, "the fill covered its range");
    }
}
