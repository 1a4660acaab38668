use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("lcached: the daemon is not built yet; `lcache keys` and `lcache parse` work offline without it");
    ExitCode::from(2)
}
