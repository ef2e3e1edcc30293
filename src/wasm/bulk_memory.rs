//! Bulk-memory instructions that a deadline can stop.
//!
//! wasmtime checks the epoch (our deadlines and guest slices) at function entries, loop headers
//! and before each bulk operation, but runs `memory.fill`, `memory.copy` and `memory.init` each as
//! one libcall that nothing interrupts: one `memory.fill` over 1 GiB of fresh memory held its shard
//! 0.59 s, whatever the invocation's deadline (perf/HOSTILE.md, "The longest single instruction").
//! Rust and C compilers emit these instructions for every `memcpy` and `memset` of a size they do
//! not know, so no guest can be asked to avoid them.
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
//! custom sections are copied as they are, and a module without these instructions is compiled
//! as it came. Only memory 0 exists here (the pool allows one memory per module); its addresses
//! are i32 or, for a 64-bit memory, i64. A `memory.init` from a segment of at most `CHUNK_BYTES`
//! copies no more than a chunk and keeps its instruction: helpers are at most one per 64 KiB of
//! data, so a module of many small segments cannot buy itself thousands of functions to compile.

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

/// An operand's type: i32, or i64 for a 64-bit memory's addresses and lengths.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Width {
    W32,
    W64,
}

impl Width {
    fn val(self) -> ValType {
        match self {
            Width::W32 => ValType::I32,
            Width::W64 => ValType::I64,
        }
    }

    fn constant(self, value: u32) -> Instruction<'static> {
        match self {
            Width::W32 => Instruction::I32Const(value as i32),
            Width::W64 => Instruction::I64Const(i64::from(value)),
        }
    }

    fn add(self) -> Instruction<'static> {
        match self {
            Width::W32 => Instruction::I32Add,
            Width::W64 => Instruction::I64Add,
        }
    }

    fn sub(self) -> Instruction<'static> {
        match self {
            Width::W32 => Instruction::I32Sub,
            Width::W64 => Instruction::I64Sub,
        }
    }

    fn gt_u(self) -> Instruction<'static> {
        match self {
            Width::W32 => Instruction::I32GtU,
            Width::W64 => Instruction::I64GtU,
        }
    }

    fn le_u(self) -> Instruction<'static> {
        match self {
            Width::W32 => Instruction::I32LeU,
            Width::W64 => Instruction::I64LeU,
        }
    }

    /// Brings the value on the stack to i64, unsigned.
    fn widen(self, f: &mut Function) {
        if self == Width::W32 {
            f.instruction(&Instruction::I64ExtendI32U);
        }
    }
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
    /// Memory 0 is 64-bit.
    memory64: bool,
    memories: u32,
    /// Each data segment's length, by index: `memory.init` checks its source range against it.
    data_lengths: Vec<u32>,
    fill: bool,
    copy: bool,
    /// The segments longer than a chunk that `memory.init` reads, each of which gets a helper.
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
        // The data section comes after the code: only now are the segments' lengths known.
        let long = |index: &u32| plan.data_lengths.get(*index as usize).is_some_and(|&len| len > CHUNK_BYTES);
        plan.inits = inits.into_iter().filter(long).collect();
        Ok(plan)
    }

    /// Notes memory 0's address type and page size; later memories are refused by the pool.
    fn memory(&mut self, memory: wasmparser::MemoryType) {
        if self.memories == 0 {
            self.page_bits = memory.page_size_log2.unwrap_or(16);
            self.memory64 = memory.memory64;
        }
        self.memories += 1;
    }

    fn needs_helpers(&self) -> bool {
        self.fill || self.copy || !self.inits.is_empty()
    }

    fn address(&self) -> Width {
        if self.memory64 {
            Width::W64
        } else {
            Width::W32
        }
    }
}

/// The helpers, in the order they are appended.
#[derive(Clone, Copy)]
enum Helper {
    Fill,
    Copy,
    Init { data_index: u32, data_length: u32 },
}

impl Helper {
    /// The widths of the instruction's operands `(d, x, n)`, which are the helper's parameters.
    fn operands(self, address: Width) -> [Width; 3] {
        match self {
            Helper::Fill => [address, Width::W32, address],
            Helper::Copy => [address; 3],
            // A segment's offsets and lengths are i32 whatever the memory.
            Helper::Init { .. } => [address, Width::W32, Width::W32],
        }
    }
}

struct Rewriter {
    plan: Plan,
    helpers: Vec<Helper>,
    /// The helpers' signatures, appended after the module's own types in this order.
    signatures: Vec<[Width; 3]>,
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
            let data_length = plan.data_lengths[data_index as usize];
            helpers.push(Helper::Init { data_index, data_length });
        }
        let mut signatures = Vec::new();
        for helper in &helpers {
            let operands = helper.operands(plan.address());
            if !signatures.contains(&operands) {
                signatures.push(operands);
            }
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
        Rewriter { plan, helpers, signatures, fill, copy, init }
    }

    /// The type index of `helper`'s signature.
    fn helper_type(&self, helper: Helper) -> u32 {
        let operands = helper.operands(self.plan.address());
        let k = self.signatures.iter().position(|s| *s == operands).expect("every helper's signature is listed");
        self.plan.types + k as u32
    }

    fn body(&self, helper: Helper) -> Function {
        let memory = MemoryShape { page_bits: self.plan.page_bits, address: self.plan.address() };
        match helper {
            Helper::Fill => chunked(Instruction::MemoryFill(0), helper, memory),
            Helper::Copy => chunked(Instruction::MemoryCopy { src_mem: 0, dst_mem: 0 }, helper, memory),
            Helper::Init { data_index, .. } => chunked(Instruction::MemoryInit { mem: 0, data_index }, helper, memory),
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

    /// As it came: wasm-encoder would parse a `name` section strictly, where wasmtime only warns
    /// about a malformed one, and no index a custom section names has moved.
    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Result<(), reencode::Error> {
        module.section(&reencode::utils::custom_section(self, section));
        Ok(())
    }

    fn parse_type_section(
        &mut self,
        types: &mut TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Result<(), reencode::Error> {
        reencode::utils::parse_type_section(self, types, section)?;
        for signature in &self.signatures {
            types.ty().function(signature.map(Width::val), std::iter::empty::<ValType>());
        }
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> Result<(), reencode::Error> {
        reencode::utils::parse_function_section(self, functions, section)?;
        for &helper in &self.helpers {
            functions.function(self.helper_type(helper));
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

/// Memory 0 as the helpers see it.
#[derive(Clone, Copy)]
struct MemoryShape {
    page_bits: u32,
    address: Width,
}

/// The helper's parameters, the instruction's operands, and one local of its own.
const DEST: u32 = 0;
const SECOND: u32 = 1;
const LEN: u32 = 2;
/// Memory 0's size in bytes, as i64, read once at the call.
const MEMORY_BYTES: u32 = 3;

/// A helper that runs `op` over `(d, x, n)` in chunks of at most [`CHUNK_BYTES`]: `op` itself
/// when `n` fits in one chunk or a range is out of bounds (so it traps before writing, as it
/// would have), else a loop, backwards for a copy whose destination is above its source.
fn chunked(op: Instruction<'static>, helper: Helper, memory: MemoryShape) -> Function {
    use Instruction as I;
    let [dw, xw, nw] = helper.operands(memory.address);
    let mut f = Function::new([(1, ValType::I64)]);
    let whole = |f: &mut Function| {
        f.instruction(&I::LocalGet(DEST)).instruction(&I::LocalGet(SECOND)).instruction(&I::LocalGet(LEN));
        f.instruction(&op).instruction(&I::Return);
    };
    f.instruction(&I::MemorySize(0));
    memory.address.widen(&mut f);
    f.instruction(&I::I64Const(i64::from(memory.page_bits))).instruction(&I::I64Shl);
    f.instruction(&I::LocalSet(MEMORY_BYTES));
    // One chunk or less, or out of bounds: the instruction as it was.
    f.instruction(&I::LocalGet(LEN)).instruction(&nw.constant(CHUNK_BYTES)).instruction(&nw.le_u());
    out_of_bounds(&mut f, (DEST, dw), nw, Bound::Memory);
    f.instruction(&I::I32Or);
    match helper {
        Helper::Fill => {}
        Helper::Copy => {
            out_of_bounds(&mut f, (SECOND, xw), nw, Bound::Memory);
            f.instruction(&I::I32Or);
        }
        Helper::Init { data_length, .. } => {
            out_of_bounds(&mut f, (SECOND, xw), nw, Bound::Segment { length: data_length });
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
        step_op(f, &op, [dw, xw, nw], None);
        advance(f, DEST, dw);
        if !matches!(helper, Helper::Fill) {
            advance(f, SECOND, xw);
        }
        shrink_and_loop(f, nw);
        f.instruction(&I::End);
        whole(f);
    };
    if matches!(helper, Helper::Copy) {
        // Destination above the source: the highest chunk first, so that no chunk's source was
        // already overwritten by an earlier one.
        f.instruction(&I::LocalGet(DEST)).instruction(&I::LocalGet(SECOND)).instruction(&dw.gt_u());
        f.instruction(&I::If(wasm_encoder::BlockType::Empty));
        f.instruction(&I::Loop(wasm_encoder::BlockType::Empty));
        f.instruction(&I::LocalGet(LEN)).instruction(&nw.constant(CHUNK_BYTES)).instruction(&nw.sub());
        f.instruction(&I::LocalSet(LEN));
        step_op(&mut f, &op, [dw, xw, nw], Some(LEN));
        f.instruction(&I::LocalGet(LEN)).instruction(&nw.constant(CHUNK_BYTES)).instruction(&nw.gt_u());
        f.instruction(&I::BrIf(0));
        f.instruction(&I::End);
        whole(&mut f);
        f.instruction(&I::End);
    }
    forwards(&mut f);
    f.instruction(&I::End);
    f
}

/// Where an operand's range must end.
enum Bound {
    /// Within memory 0, whose size the helper read at the call.
    Memory,
    /// Within a data segment of `length` bytes (a dropped one is shorter; then the first chunk
    /// traps before it writes, as the whole instruction would have).
    Segment { length: u32 },
}

/// Pushes whether `[start, start + n)` ends past `bound`: `start > end || n > end - start`, in
/// 64 bits, so that nothing wraps (a 64-bit memory's addresses included).
fn out_of_bounds(f: &mut Function, (start, width): (u32, Width), nw: Width, bound: Bound) {
    use Instruction as I;
    let end = match bound {
        Bound::Memory => I::LocalGet(MEMORY_BYTES),
        Bound::Segment { length } => I::I64Const(i64::from(length)),
    };
    f.instruction(&I::LocalGet(start));
    width.widen(f);
    f.instruction(&end).instruction(&I::I64GtU);
    f.instruction(&I::LocalGet(LEN));
    nw.widen(f);
    f.instruction(&end);
    f.instruction(&I::LocalGet(start));
    width.widen(f);
    f.instruction(&I::I64Sub).instruction(&I::I64GtU).instruction(&I::I32Or);
}

/// `op` over one chunk at `(d + offset, x + offset)`, where `offset` is the local `at` or zero.
fn step_op(f: &mut Function, op: &Instruction<'static>, [dw, xw, nw]: [Width; 3], at: Option<u32>) {
    use Instruction as I;
    f.instruction(&I::LocalGet(DEST));
    if let Some(at) = at {
        f.instruction(&I::LocalGet(at)).instruction(&dw.add());
    }
    f.instruction(&I::LocalGet(SECOND));
    // A fill's value is not an address; only a copy goes backwards, and its operands share a width.
    if let (Some(at), false) = (at, matches!(op, I::MemoryFill(_))) {
        f.instruction(&I::LocalGet(at)).instruction(&xw.add());
    }
    f.instruction(&nw.constant(CHUNK_BYTES)).instruction(op);
}

/// `local += CHUNK_BYTES`.
fn advance(f: &mut Function, local: u32, width: Width) {
    use Instruction as I;
    f.instruction(&I::LocalGet(local)).instruction(&width.constant(CHUNK_BYTES)).instruction(&width.add());
    f.instruction(&I::LocalSet(local));
}

/// `n -= CHUNK_BYTES`, and round again while more than a chunk is left.
fn shrink_and_loop(f: &mut Function, nw: Width) {
    use Instruction as I;
    f.instruction(&I::LocalGet(LEN)).instruction(&nw.constant(CHUNK_BYTES)).instruction(&nw.sub());
    f.instruction(&I::LocalTee(LEN)).instruction(&nw.constant(CHUNK_BYTES)).instruction(&nw.gt_u());
    f.instruction(&I::BrIf(0));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use wasmtime::{Engine, Instance, Module, Store, UpdateDeadline, Val};

    use super::*;

    const PAGES: u32 = 4;
    const SEGMENT_BYTES: usize = 3 * CHUNK_BYTES as usize + 123;

    /// Exports each instruction over caller-chosen operands, a passive segment for `memory.init`,
    /// and `drop` for that segment; with a 64-bit memory when `wide`.
    fn guest_of(wide: bool) -> Vec<u8> {
        let segment: String = (0..SEGMENT_BYTES).map(|i| format!("\\{:02x}", (i * 7 + 3) as u8)).collect();
        let (memory, a) = if wide { ("i64", "i64") } else { ("", "i32") };
        wat::parse_str(format!(
            r#"(module
  (memory (export "memory") {memory} {PAGES})
  (data $seg "{segment}")
  (func (export "fill") (param {a} i32 {a}) (memory.fill (local.get 0) (local.get 1) (local.get 2)))
  (func (export "copy") (param {a} {a} {a}) (memory.copy (local.get 0) (local.get 1) (local.get 2)))
  (func (export "init") (param {a} i32 i32) (memory.init $seg (local.get 0) (local.get 1) (local.get 2)))
  (func (export "drop") (data.drop $seg)))"#
        ))
        .unwrap()
    }

    fn guest() -> Vec<u8> {
        guest_of(false)
    }

    /// The operands as the function of `op` takes them: addresses and lengths in the memory's
    /// width, a segment's offset and length and a fill's value in 32 bits.
    fn args(op: &str, wide: bool, (d, x, n): (u64, u64, u64)) -> Vec<Val> {
        let address = |v: u64| if wide { Val::I64(v as i64) } else { Val::I32(v as u32 as i32) };
        let narrow = |v: u64| Val::I32(v as u32 as i32);
        match op {
            "fill" => vec![address(d), narrow(x), address(n)],
            "copy" => vec![address(d), address(x), address(n)],
            _ => vec![address(d), narrow(x), narrow(n)],
        }
    }

    /// Runs `op(d, x, n)` (after `drop` when `dropped`) on a fresh instance of `wasm` whose memory
    /// holds a pattern: whether it trapped, and the memory afterwards.
    fn run(
        engine: &Engine,
        wasm: &[u8],
        op: &str,
        operands: (u64, u64, u64),
        dropped: bool,
        wide: bool,
    ) -> (bool, Vec<u8>) {
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
        let f = instance.get_func(&mut store, op).unwrap();
        let trapped = f.call(&mut store, &args(op, wide, operands), &mut []).is_err();
        (trapped, memory.data(&store).to_vec())
    }

    fn operand() -> impl Strategy<Value = u64> {
        let memory = u64::from(PAGES) * 65536;
        let chunk = u64::from(CHUNK_BYTES);
        prop_oneof![
            0..memory + 2 * chunk,
            Just(0),
            (0..3u64).prop_map(move |k| memory - k),
            (0..4u64).prop_map(move |k| k * chunk),
            any::<u32>().prop_map(u64::from),
            (0..3u64).prop_map(|k| u64::MAX - k),
            any::<u64>(),
        ]
    }

    fn length() -> impl Strategy<Value = u64> {
        let chunk = i64::from(CHUNK_BYTES);
        prop_oneof![
            0..u64::from(PAGES) * 65536 + 1,
            (0..5i64, -1i64..=1).prop_map(move |(k, e)| (k * chunk + e).max(0) as u64),
            any::<u32>().prop_map(u64::from),
            any::<u64>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The rewritten module does what the original does, byte for byte, and traps where it
        /// traps without writing anything first: overlapping copies both ways, ranges that end
        /// exactly at the memory's or the segment's end or one past it, lengths around chunk
        /// boundaries, and addresses that would wrap, in 32-bit and 64-bit memories.
        #[test]
        fn the_rewrite_changes_nothing_but_where_a_deadline_can_stop(
            op in prop_oneof![Just("fill"), Just("copy"), Just("init")],
            d in operand(), x in operand(), n in length(), dropped in any::<bool>(), wide in any::<bool>(),
        ) {
            let engine = Engine::default();
            let original = guest_of(wide);
            let rewritten = make_interruptible(&original).unwrap();
            prop_assert!(matches!(rewritten, Cow::Owned(_)));
            let x = if op == "fill" { x & 0xff } else { x };
            let before = run(&engine, &original, op, (d, x, n), dropped, wide);
            let after = run(&engine, &rewritten, op, (d, x, n), dropped, wide);
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

    /// A `name` section wasm-encoder would not parse still compiles, as wasmtime takes it: custom
    /// sections are copied as they came.
    #[test]
    fn custom_sections_are_copied_as_they_came() {
        let wasm = wat::parse_str(
            r#"(module (memory 1)
  (func (export "f") (memory.fill (i32.const 0) (i32.const 0) (i32.const 100)))
  (@custom "name" "\01\03\05\00\01"))"#,
        )
        .unwrap();
        let rewritten = make_interruptible(&wasm).unwrap();
        assert!(matches!(rewritten, Cow::Owned(_)));
        Module::new(&Engine::default(), &rewritten).unwrap();
    }

    /// Only a segment longer than a chunk gets a helper: many small ones cost nothing to compile.
    #[test]
    fn memory_init_from_a_short_segment_keeps_its_instruction() {
        let inits: String =
            (0..50).map(|k| format!("(memory.init $s{k} (i32.const 0) (i32.const 0) (i32.const 1))")).collect();
        let segments: String = (0..50).map(|k| format!("(data $s{k} \"x\")")).collect();
        let long = "y".repeat(CHUNK_BYTES as usize + 1);
        let wasm = wat::parse_str(format!(
            r#"(module (memory 4) {segments} (data $long "{long}")
  (func (export "f") {inits} (memory.init $long (i32.const 0) (i32.const 0) (i32.const 1))))"#
        ))
        .unwrap();
        let functions = |wasm: &[u8]| {
            wasmparser::Parser::new(0)
                .parse_all(wasm)
                .find_map(|p| match p.unwrap() {
                    Payload::FunctionSection(s) => Some(s.count()),
                    _ => None,
                })
                .unwrap()
        };
        let rewritten = make_interruptible(&wasm).unwrap();
        assert_eq!(functions(&rewritten), functions(&wasm) + 1, "one helper, for the long segment");
        Module::new(&Engine::default(), &rewritten).unwrap();
    }
}
