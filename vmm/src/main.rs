//! The `hvprobe` binary. When it runs as PID 1 it is the emulated runner's L1 `/init`.

fn main() {
    if std::process::id() == 1 {
        hvprobe_vmm::l1init::main();
    }
    std::process::exit(hvprobe_vmm::cli::main_with_args(
        std::env::args_os().skip(1),
    ));
}
