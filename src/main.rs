//! The `qimg` command line: qemu-img compatible commands on top of the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
