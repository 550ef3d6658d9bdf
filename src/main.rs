//! Thin entry point: parse arguments and hand over to `carewall::cli`.

fn main() -> std::process::ExitCode {
    carewall::cli::main()
}
