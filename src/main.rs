//! The `infergate` command: run the gateway, or check a config file.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "infergate",
    version,
    about = "OpenAI-compatible gateway for self-hosted LLM engines"
)]
struct Cli {
    /// YAML config file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
    /// Validate the config, print every error with its YAML path, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    infergate::logging::init();
    let cli = Cli::parse();
    let config = match infergate::config::load_file(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: {} error(s):", cli.config.display(), errors.len());
            for e in &errors {
                eprintln!("  {e}");
            }
            return ExitCode::from(2);
        }
    };
    if cli.check {
        let models: usize = config
            .pools
            .iter()
            .map(|p| p.models.len() + p.aliases.len())
            .sum();
        let filters = infergate_filters::Chain::from_config(&config.filters).names();
        println!(
            "{}: OK ({} pools, {} model names, {} backends; filters: [{}])",
            cli.config.display(),
            config.pools.len(),
            models,
            config.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
            filters.join(", ")
        );
        return ExitCode::SUCCESS;
    }
    match infergate::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infergate: {e}");
            ExitCode::from(1)
        }
    }
}
