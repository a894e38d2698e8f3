//! Kernel stack traces at probe hits (`stacktrace` in a definition, `--stack` for every probe):
//! the unwinder of the guest's kernel (probe-core's [`KernelUnwinder`], with the tables read
//! from its vmlinux), each hit's stack symbolized for the hit lines and JSON, and every stack
//! counted into folded stacks for `--stacks FILE` and `--flamegraph FILE.svg`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use probe_core::btf::Btf;
use probe_core::probe::ProbeContext;
use probe_core::symbols::SymbolMap;
use probe_core::unwind::folded::FoldedStacks;
use probe_core::unwind::{KernelUnwinder, TraceEnd, UnwindTables};

use crate::arch::Guest;
use crate::summary::StackCount;

/// Errors of setting up stack traces or writing their files.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The tables could not be read.
    #[error("stack traces: {0}")]
    Tables(String),
    /// A file could not be written.
    #[error("writing {path}: {detail}")]
    Write {
        /// Which file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// The stack traces of a run, shared by every probe's handlers.
pub struct StackWiring {
    /// The guest kernel's unwinder.
    pub unwinder: KernelUnwinder<Guest>,
    /// `--stack`: every probe's hits carry their stack, not only `stacktrace` definitions'.
    pub all: bool,
    /// Every stack seen, for `--stacks`, `--flamegraph` and the summary.
    pub folded: Arc<FoldedStacks>,
    /// The guest's System.map.
    pub map: Arc<SymbolMap>,
}

/// One hit's stack, symbolized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HitStack {
    /// `function+0xoff/0xsize` per frame, innermost first.
    pub frames: Vec<String>,
    /// How the walk ended.
    pub end: TraceEnd,
}

impl HitStack {
    /// The lines ftrace's `stacktrace` trigger prints after an event (` => vfs_read+0x5/0x1a0`),
    /// and a last line marking a user-mode end or an early stop.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.frames {
            out.push_str(" => ");
            out.push_str(f);
            out.push('\n');
        }
        if let Some(m) = self.end.marker() {
            out.push_str(" => ");
            out.push_str(&m);
            out.push('\n');
        }
        out
    }

    /// The fields a JSON event gets: `stack` (the frames), `stack_end` (`user`, `end` or
    /// `unreliable`) and, for an early stop, `stack_error`.
    pub fn json_fields(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        obj.insert("stack".into(), self.frames.clone().into());
        obj.insert("stack_end".into(), self.end.name().into());
        if let TraceEnd::Unreliable(why) = &self.end {
            obj.insert("stack_error".into(), why.to_string().into());
        }
    }
}

impl StackWiring {
    /// The stack of the hit in `ctx` (for a return probe, of its entry), symbolized and
    /// counted under `event`.
    pub fn capture(&self, ctx: &ProbeContext<'_>, event: &str, slide: u64) -> HitStack {
        let at = ctx.entry_context();
        let trace = self.unwinder.unwind(at.as_ref().unwrap_or(ctx), slide);
        let frames = trace.symbolized(&self.map, slide);
        self.folded.add(event, &frames, &trace.end);
        HitStack {
            frames,
            end: trace.end,
        }
    }
}

/// The unwind tables of the guest kernel: the file carried into the emulated runner's L1, or
/// read from the vmlinux `--btf` names.
pub fn read_tables(
    carried: Option<&Path>,
    vmlinux: Option<&Path>,
    map: &SymbolMap,
) -> Result<UnwindTables, StackError> {
    if let Some(path) = carried {
        let bytes = std::fs::read(path)
            .map_err(|e| StackError::Tables(format!("reading {}: {e}", path.display())))?;
        return UnwindTables::from_bytes(&bytes).map_err(|e| StackError::Tables(e.to_string()));
    }
    let path = vmlinux.ok_or_else(|| {
        StackError::Tables("they need the guest kernel's vmlinux (--btf VMLINUX)".into())
    })?;
    let elf = std::fs::read(path)
        .map_err(|e| StackError::Tables(format!("reading {}: {e}", path.display())))?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(StackError::Tables(format!(
            "they need the guest kernel's vmlinux, and {} is not an ELF file (a raw BTF section?)",
            path.display()
        )));
    }
    UnwindTables::from_vmlinux(&elf, map)
        .map_err(|e| StackError::Tables(format!("{}: {e}", path.display())))
}

/// The unwinder for the kernel of `tables`, `btf` and `map`.
pub fn unwinder(
    tables: &UnwindTables,
    btf: &Btf,
    map: &SymbolMap,
) -> Result<KernelUnwinder<Guest>, StackError> {
    KernelUnwinder::new(tables, btf, map).map_err(|e| StackError::Tables(e.to_string()))
}

/// Writes the stacks of a run's summary, folded, to `stacks` and renders them as an SVG flame
/// graph to `flamegraph` (inferno, the Rust port of FlameGraph), whichever are given: the same
/// on the host and from an emulated runner's inner summary.
pub fn write_files(
    counts: &[StackCount],
    stacks: Option<&Path>,
    flamegraph: Option<&Path>,
) -> Result<(), StackError> {
    let text: String = counts
        .iter()
        .map(|s| format!("{} {}\n", s.stack, s.count))
        .collect();
    let text = text.as_str();
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |e: &dyn std::fmt::Display| StackError::Write {
            path,
            detail: e.to_string(),
        }
    };
    if let Some(path) = stacks {
        std::fs::write(path, text).map_err(|e| failed(path)(&e))?;
    }
    if let Some(path) = flamegraph {
        let file = std::fs::File::create(path).map_err(|e| failed(path)(&e))?;
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = "hvprobe: kernel stacks at probe hits".into();
        opts.count_name = "hits".into();
        if text.is_empty() {
            // inferno refuses an empty input; an empty graph says "no stacks" plainly.
            opts.subtitle = Some("no stacks were recorded".into());
        }
        let lines: Vec<&str> = if text.is_empty() {
            vec!["(no stacks) 1"]
        } else {
            text.lines().collect()
        };
        inferno::flamegraph::from_lines(&mut opts, lines, std::io::BufWriter::new(file))
            .map_err(|e| failed(path)(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_core::unwind::UnwindStop;

    #[test]
    fn stacks_print_as_ftrace_does_and_files_are_written() {
        let s = HitStack {
            frames: vec!["vfs_read+0x0/0x1a0".into(), "ksys_read+0x6f/0xf0".into()],
            end: TraceEnd::UserMode,
        };
        assert_eq!(
            s.text(),
            " => vfs_read+0x0/0x1a0\n => ksys_read+0x6f/0xf0\n => <user>\n"
        );
        let cut = HitStack {
            frames: vec!["vfs_read+0x0/0x1a0".into()],
            end: TraceEnd::Unreliable(UnwindStop::OffStack(0x1000)),
        };
        assert!(
            cut.text()
                .ends_with(" => (unreliable: 0x1000 is on no known kernel stack)\n")
        );
        let mut obj = serde_json::Map::new();
        cut.json_fields(&mut obj);
        assert_eq!(obj["stack_end"], "unreliable");
        assert_eq!(obj["stack"][0], "vfs_read+0x0/0x1a0");

        let dir = std::env::temp_dir().join(format!("hvprobe-stacks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (folded, svg) = (dir.join("s.folded"), dir.join("s.svg"));
        let text = "hv/a;do_syscall_64;ksys_read;vfs_read 3\n";
        let counts = [StackCount {
            stack: "hv/a;do_syscall_64;ksys_read;vfs_read".into(),
            count: 3,
        }];
        write_files(&counts, Some(&folded), Some(&svg)).unwrap();
        assert_eq!(std::fs::read_to_string(&folded).unwrap(), text);
        let picture = std::fs::read_to_string(&svg).unwrap();
        assert!(picture.starts_with("<?xml") && picture.contains("ksys_read"));
        write_files(&[], None, Some(&svg)).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("no stacks"));
        let bad = write_files(&counts, Some(&dir.join("missing/dir/x")), None).unwrap_err();
        assert!(bad.to_string().contains("missing/dir/x"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
