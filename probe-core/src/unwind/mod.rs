//! Unwinding the guest kernel's stacks from the host (issue 22, under way): the x86_64 ORC
//! tables of the guest's vmlinux ([`orc`]). The unwinders that walk a stopped vCPU's stack
//! through them come next.

pub mod orc;
