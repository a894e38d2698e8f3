//! Evaluation of kprobe_events fetch arguments ([`crate::definition`]) at a hit, against the
//! handler context: registers, the stack, guest memory, symbols.

use crate::arch::{Arch, RegisterFile};
use crate::definition::{Fetch, FetchArg, FetchType, ProbeDefinition};
use crate::probe::{HandlerError, ProbeContext};
use crate::symbols::SymbolMap;
use crate::task::{TaskAware, TaskLayout};

/// What fetch arguments may need besides the hit itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchEnv<'a> {
    /// The guest kernel's symbols (`@SYMBOL`, `:symbol`).
    pub symbols: Option<&'a SymbolMap>,
    /// Where the current task is (`$comm`).
    pub task: Option<&'a TaskLayout>,
    /// How far KASLR moved the kernel from its System.map addresses.
    pub slide: u64,
    /// For a return probe evaluated against its entry registers: the return value.
    pub retval: Option<u64>,
}

/// The first `%REG` in `def`'s fetch args that names no register, so that a typo fails
/// when the definition is given rather than as a handler error at every hit.
pub fn unknown_register<A: Arch>(def: &ProbeDefinition) -> Option<&str> {
    fn walk<A: Arch>(f: &Fetch) -> Option<&str> {
        match f {
            Fetch::Register(r) if A::Registers::default().by_name(r).is_none() => Some(r),
            Fetch::Dereference { inner, .. } => walk::<A>(inner),
            _ => None,
        }
    }
    def.args.iter().find_map(|a| walk::<A>(&a.fetch))
}

/// A fetched value, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchValue {
    /// A number, with how to show it.
    Number(u64, FetchType),
    /// A string.
    Text(String),
}

impl std::fmt::Display for FetchValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchValue::Number(v, FetchType::Unsigned(_)) => write!(f, "{v}"),
            FetchValue::Number(v, FetchType::Signed(bits)) => {
                let shift = 64 - u32::from(*bits);
                write!(f, "{}", ((*v << shift) as i64) >> shift)
            }
            FetchValue::Number(v, _) => write!(f, "{v:#x}"),
            FetchValue::Text(s) => write!(f, "\"{}\"", s.escape_default()),
        }
    }
}

/// Longest string a fetch reads.
const MAX_STRING: usize = 256;

fn mask(v: u64, bits: u8) -> u64 {
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

/// The raw 64-bit value of `fetch`.
fn raw<A: Arch>(
    ctx: &ProbeContext<'_, A>,
    fetch: &Fetch,
    env: FetchEnv<'_>,
) -> Result<u64, HandlerError> {
    Ok(match fetch {
        Fetch::Register(r) => ctx
            .regs
            .by_name(r)
            .ok_or_else(|| HandlerError(format!("unknown register %{r}")))?,
        Fetch::Memory(a) => ctx.read_u64(*a)?,
        Fetch::SymbolMemory { name, offset } => {
            let map = env
                .symbols
                .ok_or_else(|| HandlerError("no symbol table".into()))?;
            let sym = map.lookup(name).map_err(|e| HandlerError(e.to_string()))?;
            ctx.read_u64(
                sym.addr
                    .wrapping_add(env.slide)
                    .wrapping_add(*offset as u64),
            )?
        }
        Fetch::StackEntry(n) => ctx.read_u64(ctx.regs.sp().wrapping_add(8 * u64::from(*n)))?,
        Fetch::StackPointer => ctx.regs.sp(),
        Fetch::ReturnValue => env.retval.unwrap_or(ctx.regs.return_value()),
        Fetch::Argument(n) => ctx.arg(*n as usize - 1).ok_or_else(|| {
            HandlerError(format!(
                "$arg{n}: {} passes only {} arguments in registers",
                A::NAME,
                ctx.regs.register_args()
            ))
        })?,
        Fetch::Comm => {
            // A string fetch: evaluate() reads the name itself; as a number it has no value.
            return Err(HandlerError("$comm is a string".into()));
        }
        Fetch::Dereference { offset, inner, .. } => {
            let base = raw(ctx, inner, env)?;
            ctx.read_u64(base.wrapping_add(*offset as u64))?
        }
    })
}

/// Evaluates one fetch argument at a hit.
pub fn evaluate<A: TaskAware>(
    ctx: &ProbeContext<'_, A>,
    arg: &FetchArg,
    env: FetchEnv<'_>,
) -> Result<FetchValue, HandlerError> {
    if arg.fetch == Fetch::Comm {
        let layout = env
            .task
            .ok_or_else(|| HandlerError("$comm needs the kernel's BTF (task layout)".into()))?;
        return Ok(FetchValue::Text(layout.current(ctx)?.comm));
    }
    if matches!(arg.ty, FetchType::String | FetchType::UserString) {
        // As the kernel does: for a string the outermost dereference names the string's
        // address (`+0(%si):string` is the string at %si), and a plain value is the address.
        let at = match &arg.fetch {
            Fetch::Dereference { offset, inner, .. } => {
                raw(ctx, inner, env)?.wrapping_add(*offset as u64)
            }
            other => raw(ctx, other, env)?,
        };
        return Ok(FetchValue::Text(ctx.read_c_string(at, MAX_STRING)?));
    }
    let value = raw(ctx, &arg.fetch, env)?;
    Ok(match arg.ty {
        FetchType::String | FetchType::UserString => {
            FetchValue::Text(ctx.read_c_string(value, MAX_STRING)?)
        }
        FetchType::Symbol => FetchValue::Text(env.symbols.map_or_else(
            || format!("{value:#x}"),
            |m| m.describe(value.wrapping_sub(env.slide)),
        )),
        FetchType::Unsigned(b) | FetchType::Signed(b) | FetchType::Hex(b) => {
            FetchValue::Number(mask(value, b), arg.ty)
        }
    })
}

/// `name=value` for every argument; an argument that cannot be read shows as `name=(fault)`,
/// as the kernel's trace output does.
pub fn format_args<A: TaskAware>(
    ctx: &ProbeContext<'_, A>,
    args: &[FetchArg],
    env: FetchEnv<'_>,
) -> String {
    args.iter()
        .map(|a| match evaluate(ctx, a, env) {
            Ok(v) => format!("{}={v}", a.name),
            Err(_) => format!("{}=(fault)", a.name),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::arch::x86_64::{Gpr, X86_64};
    use crate::definition::ProbeDefinition;
    use crate::fake::{STACK_GPA, STACK_VA, context, machine};

    #[test]
    fn fetch_args_read_registers_stack_memory_and_strings() {
        let (engine, mut vcpu) = machine();
        let sp = STACK_VA + 0x100;
        vcpu.regs.set(Gpr::Rsp, sp);
        vcpu.regs.set(Gpr::Rdi, 0x1ff);
        vcpu.regs.set(Gpr::Rsi, STACK_VA + 0x200);
        vcpu.regs.set(Gpr::Rax, (-5i64) as u64);
        let mem = engine.memory();
        mem.write_obj(STACK_VA + 0x200, GuestAddress(STACK_GPA + 0x100))
            .unwrap();
        mem.write_obj(0x1234_5678u64, GuestAddress(STACK_GPA + 0x108))
            .unwrap();
        mem.write_slice(b"hello\0", GuestAddress(STACK_GPA + 0x200))
            .unwrap();
        let ctx = context(mem, &vcpu.regs);
        let def = ProbeDefinition::parse(
            "r f di=%di:u8 rdi=%rdi:u64 a1=$arg1:s8 s1=$stack1 st=$stack p=+0(%sp):x64 \
             str=$arg2:string str2=+1($arg2):string d=+8($stack):u32 ret=$retval:s64 bad=+0(%ip)",
        )
        .unwrap();
        let line = format_args(&ctx, &def.args, FetchEnv::default());
        assert_eq!(
            line,
            format!(
                "di=255 rdi=511 a1=-1 s1=0x12345678 st={sp:#x} p={:#x} str=\"hello\" str2=\"ello\" d=305419896 ret=-5 bad=(fault)",
                STACK_VA + 0x200
            )
        );
    }

    #[test]
    fn unknown_registers_are_found_in_nested_fetch_args() {
        let ok = ProbeDefinition::parse("p f a=%di b=%r15 c=%ip d=%flags e=+8(+0(%rsi))").unwrap();
        assert_eq!(unknown_register::<X86_64>(&ok), None);
        let bad = ProbeDefinition::parse("p f a=%di b=+4(+0(%xyz)):u32").unwrap();
        assert_eq!(unknown_register::<X86_64>(&bad), Some("xyz"));
    }
}
