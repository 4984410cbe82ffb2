use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = frugal::cli::Cli::parse();
    match frugal::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
