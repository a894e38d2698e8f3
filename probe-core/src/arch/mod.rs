//! Architecture back ends. Each architecture is a marker type implementing [`Arch`]: what a
//! breakpoint looks like, how an instruction is decoded and classified into a step plan, and
//! how its register file exposes the few values the engine needs. The engine is written against
//! the trait; the per-arch code stays in this directory.

pub mod aarch64;
pub mod x86_64;

use std::fmt::Debug;

/// The registers of one vCPU as the engine and the handlers see them.
pub trait RegisterFile: Clone + Debug + Default + Send {
    /// The program counter.
    fn pc(&self) -> u64;
    /// Sets the program counter.
    fn set_pc(&mut self, pc: u64);
    /// The stack pointer.
    fn sp(&self) -> u64;
    /// Argument register `n` (0-based) of the kernel's calling convention, if there is one.
    fn arg(&self, n: usize) -> Option<u64>;
    /// A register by its conventional name (`rdi`, `x0`, ...), for output and fetch args.
    fn by_name(&self, name: &str) -> Option<u64>;
}

/// An instruction set the probe engine supports.
pub trait Arch: Send + Sync + 'static {
    /// The register file.
    type Registers: RegisterFile;
    /// How one probed instruction is executed after the handlers ran.
    type Plan: Clone + Debug + Send + Sync;
    /// Short name for messages.
    const NAME: &'static str;
    /// The bytes of the software breakpoint written over a probed instruction.
    const BREAKPOINT: &'static [u8];
    /// Longest instruction encoding.
    const MAX_INSN_LEN: usize;
}
