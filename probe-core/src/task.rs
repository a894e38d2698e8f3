//! Which guest task a probe hit happened in, without a guest agent: `current` as the kernel
//! finds it (an extension of the architecture, [`TaskAware::current_task`]: the per-CPU
//! `current_task` pointer through the GS base on x86_64, SP_EL0 on arm64) and the
//! `task_struct` offsets of `comm`, `pid` and `tgid` from the kernel's own BTF.

use crate::arch::Arch;
use crate::arch::aarch64::Aarch64;
use crate::arch::x86_64::X86_64;
use crate::btf::{Btf, BtfError};
use crate::probe::{HandlerError, ProbeContext};
use crate::symbols::SymbolMap;

/// Errors of working out the task layout.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A `task_struct` member is missing from BTF.
    #[error("task_struct layout: {0}")]
    Btf(#[from] BtfError),
    /// Neither `current_task` nor `pcpu_hot` is in System.map.
    #[error("System.map has neither the per-CPU current_task nor pcpu_hot")]
    NoCurrentTask,
}

/// Task awareness, an extension of an architecture (kept out of [`Arch`], which the engine
/// needs, so that the architectures depend on nothing above them): where its kernel keeps the
/// current task.
pub trait TaskAware: Arch {
    /// Where the kernel keeps the current task: the per-CPU offset of its pointer (x86_64),
    /// or `None` when a register holds it (arm64's SP_EL0). An error if this kernel's symbols
    /// do not say.
    fn current_task_anchor(map: &SymbolMap, btf: &Btf) -> Result<Option<u64>, TaskError>;

    /// The address of the current `task_struct` at a hit.
    fn current_task(ctx: &ProbeContext<'_, Self>, anchor: Option<u64>)
    -> Result<u64, HandlerError>;
}

impl TaskAware for X86_64 {
    fn current_task_anchor(map: &SymbolMap, btf: &Btf) -> Result<Option<u64>, TaskError> {
        match map.lookup("current_task") {
            Ok(s) => Ok(Some(s.addr)),
            // Since 6.2 the pointer lives in struct pcpu_hot.
            Err(_) => {
                let hot = map
                    .lookup("pcpu_hot")
                    .map_err(|_| TaskError::NoCurrentTask)?;
                Ok(Some(
                    hot.addr + btf.member_offset("pcpu_hot", "current_task")?,
                ))
            }
        }
    }

    fn current_task(
        ctx: &ProbeContext<'_, X86_64>,
        anchor: Option<u64>,
    ) -> Result<u64, HandlerError> {
        // In kernel mode, after `swapgs`, GS base is this CPU's per-CPU area.
        let offset = anchor.ok_or_else(|| HandlerError("no per-CPU current_task offset".into()))?;
        ctx.read_u64(ctx.regs.gs_base.wrapping_add(offset))
    }
}

impl TaskAware for Aarch64 {
    fn current_task_anchor(_map: &SymbolMap, _btf: &Btf) -> Result<Option<u64>, TaskError> {
        Ok(None)
    }

    fn current_task(
        ctx: &ProbeContext<'_, Aarch64>,
        _anchor: Option<u64>,
    ) -> Result<u64, HandlerError> {
        // arm64 keeps `current` in SP_EL0 while in the kernel.
        Ok(ctx.regs.sp_el0)
    }
}

/// Where the current task and its identity are in this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// Where the architecture finds the current task: the per-CPU offset of its pointer on
    /// x86_64, nothing on arm64 (a register holds it).
    pub current_task: Option<u64>,
    /// `task_struct.pid`.
    pub pid: u64,
    /// `task_struct.tgid`.
    pub tgid: u64,
    /// `task_struct.comm`.
    pub comm: u64,
}

/// The task a hit happened in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// `comm`, the task's name.
    pub comm: String,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
}

/// Length of `task_struct.comm` (TASK_COMM_LEN).
const COMM_LEN: usize = 16;

impl TaskLayout {
    /// The layout of the `A` kernel that `btf` and `map` describe.
    pub fn from_kernel<A: TaskAware>(btf: &Btf, map: &SymbolMap) -> Result<TaskLayout, TaskError> {
        Ok(TaskLayout {
            current_task: A::current_task_anchor(map, btf)?,
            pid: btf.member_offset("task_struct", "pid")?,
            tgid: btf.member_offset("task_struct", "tgid")?,
            comm: btf.member_offset("task_struct", "comm")?,
        })
    }

    /// The task running on the vCPU of `ctx` (valid in kernel mode).
    pub fn current<A: TaskAware>(
        &self,
        ctx: &ProbeContext<'_, A>,
    ) -> Result<TaskInfo, HandlerError> {
        let task = A::current_task(ctx, self.current_task)?;
        let mut ids = [0u8; 8];
        ctx.read_memory(task.wrapping_add(self.pid), &mut ids[..4])?;
        ctx.read_memory(task.wrapping_add(self.tgid), &mut ids[4..])?;
        let mut comm = [0u8; COMM_LEN];
        ctx.read_memory(task.wrapping_add(self.comm), &mut comm)?;
        let end = comm.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
        Ok(TaskInfo {
            comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
            pid: u32::from_le_bytes(ids[..4].try_into().unwrap_or([0; 4])),
            tgid: u32::from_le_bytes(ids[4..].try_into().unwrap_or([0; 4])),
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::arch::x86_64::X86_64;
    use crate::btf::build_test_btf;
    use crate::fake::{STACK_GPA, STACK_VA, context, machine};

    #[test]
    fn the_current_task_is_read_through_the_per_cpu_pointer() {
        let btf = Btf::parse(&build_test_btf(&[(
            "task_struct",
            512,
            &[("pid", 0x40), ("tgid", 0x44), ("comm", 0x80)],
        )]))
        .unwrap();
        let map = SymbolMap::parse("0000000000000010 D current_task\n").unwrap();
        let layout = TaskLayout::from_kernel::<X86_64>(&btf, &map).unwrap();
        assert_eq!((layout.current_task, layout.comm), (Some(0x10), 0x80));

        // The stack page doubles as the per-CPU area (GS base) and the task_struct.
        let (engine, mut vcpu) = machine();
        vcpu.regs.gs_base = STACK_VA;
        let task = STACK_VA + 0x100;
        let mem = engine.memory();
        mem.write_obj(task, GuestAddress(STACK_GPA + 0x10)).unwrap();
        mem.write_obj(77u32, GuestAddress(STACK_GPA + 0x140))
            .unwrap();
        mem.write_obj(70u32, GuestAddress(STACK_GPA + 0x144))
            .unwrap();
        mem.write_slice(b"getpid-loop\0", GuestAddress(STACK_GPA + 0x180))
            .unwrap();
        let ctx = context(mem, &vcpu.regs);
        let t = layout.current(&ctx).unwrap();
        assert_eq!(
            t,
            TaskInfo {
                comm: "getpid-loop".into(),
                pid: 77,
                tgid: 70
            }
        );

        let no = SymbolMap::parse("ffffffff81000000 T _stext\n").unwrap();
        assert!(matches!(
            TaskLayout::from_kernel::<X86_64>(&btf, &no),
            Err(TaskError::NoCurrentTask)
        ));
    }
}
