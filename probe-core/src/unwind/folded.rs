//! Folded stacks: one line per distinct stack, `root;caller;...;leaf COUNT`, the format
//! Brendan Gregg's FlameGraph, inferno and speedscope read. Frames are function names (the
//! offsets dropped, so that calls from different lines of one function merge); the root is
//! the probe's event, so one file holds every probe's stacks side by side.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::unwind::TraceEnd;

/// The root-side frame of a stack cut short, so a flame graph shows where the walk gave up.
pub const TRUNCATED: &str = "[unreliable]";

/// Distinct stacks and how often each was seen, per probe.
#[derive(Debug, Default)]
pub struct FoldedStacks {
    counts: Mutex<HashMap<String, u64>>,
}

/// A function name from a symbolized frame (`vfs_read+0x5/0x1a0` -> `vfs_read`); `;` and
/// spaces, which the format reserves, become `_`.
fn function(frame: &str) -> String {
    frame
        .split('+')
        .next()
        .unwrap_or(frame)
        .replace([';', ' '], "_")
}

impl FoldedStacks {
    /// An empty set.
    pub fn new() -> FoldedStacks {
        FoldedStacks::default()
    }

    /// The folded line (without the count) of a stack of `frames` (symbolized, innermost
    /// first) that ended with `end`, under `root`.
    pub fn fold(root: &str, frames: &[String], end: &TraceEnd) -> String {
        let mut parts = vec![function(root)];
        if matches!(end, TraceEnd::Unreliable(_)) {
            parts.push(TRUNCATED.to_string());
        }
        parts.extend(frames.iter().rev().map(|f| function(f)));
        parts.join(";")
    }

    /// Counts one stack.
    pub fn add(&self, root: &str, frames: &[String], end: &TraceEnd) {
        let line = FoldedStacks::fold(root, frames, end);
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(line)
            .or_insert(0) += 1;
    }

    /// Every stack with its count, most frequent first (then by name, for a stable order).
    pub fn sorted(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// The folded file's text.
    pub fn text(&self) -> String {
        self.sorted()
            .into_iter()
            .map(|(line, n)| format!("{line} {n}\n"))
            .collect()
    }

    /// Whether no stack was counted.
    pub fn is_empty(&self) -> bool {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind::UnwindStop;

    #[test]
    fn stacks_fold_root_first_and_merge_by_function() {
        let f = FoldedStacks::new();
        let a = [
            "vfs_read+0x0/0x1a0",
            "ksys_read+0x6f/0xf0",
            "do_syscall_64+0x38/0x90",
        ]
        .map(String::from);
        let b = [
            "vfs_read+0x0/0x1a0",
            "ksys_read+0x70/0xf0",
            "do_syscall_64+0x38/0x90",
        ]
        .map(String::from);
        f.add("hv/a", &a, &TraceEnd::UserMode);
        f.add("hv/a", &b, &TraceEnd::UserMode);
        f.add(
            "hv/a",
            &a[..1],
            &TraceEnd::Unreliable(UnwindStop::TooDeep(1)),
        );
        assert_eq!(
            f.text(),
            "hv/a;do_syscall_64;ksys_read;vfs_read 2\nhv/a;[unreliable];vfs_read 1\n"
        );
    }
}
