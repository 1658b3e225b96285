//! The `infergate` command: run the gateway, check a config file, or manage
//! API keys and users.

use clap::{Parser, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc instead of glibc malloc: about 17% less CPU per request under
/// load (glibc's arena locks showed up in `perf`), and with its background
/// purge thread the memory of closed connections goes back to the system
/// (glibc kept it, and grew again on the next wave). docs/performance.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "infergate",
    version,
    about = "OpenAI-compatible gateway for self-hosted LLM engines",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// YAML config file (required to run or check).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the config (and load the files it names), print every error
    /// with its YAML path, and exit.
    #[arg(long)]
    check: bool,
    /// Zero-downtime upgrade: take the listening sockets over from the
    /// running infergate, which hands them over (on `server.upgrade_sock`)
    /// when it gets SIGQUIT and then drains. See docs/operations.md.
    #[arg(long, short = 'u')]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// API keys for the `auth` filter's api_keys_file.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Users (email + password) for `POST /user/user_login`.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Print a fresh random key, its SHA-256 form, and a keys-file entry.
    New {
        /// The `user` the key belongs to.
        #[arg(long, default_value = "user")]
        user: String,
        /// `user` or `admin`.
        #[arg(long, default_value = "user")]
        role: String,
    },
}

#[derive(Subcommand)]
enum UsersAction {
    /// Add a user, or set a new password for an existing one (which bumps its
    /// version and revokes its tokens). The password is read from the first
    /// line of standard input, never from the command line.
    Add {
        /// The users file (created if missing; written atomically).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        #[arg(long)]
        email: String,
        /// `user` or `admin`.
        #[arg(long, default_value = "user")]
        role: String,
        /// Numeric id; default: the next free one.
        #[arg(long)]
        user_id: Option<u64>,
    },
}

fn main() -> ExitCode {
    infergate::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Keys {
            action: KeysAction::New { user, role },
        }) => return keys_new(&user, &role),
        Some(Command::Users {
            action:
                UsersAction::Add {
                    file,
                    email,
                    role,
                    user_id,
                },
        }) => return users_add(&file, &email, &role, user_id),
        None => {}
    }
    let Some(path) = cli.config else {
        eprintln!("infergate: give a config file with -c FILE (see --help)");
        return ExitCode::from(2);
    };
    let config = match infergate::config::load_file(&path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: {} error(s):", path.display(), errors.len());
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
        // Load what the filters load (keys, users, JWT keys, the quota
        // store), so a file that would fail at start fails here.
        let built = match infergate_filters::registry::build(&config.filters) {
            Ok(built) => built,
            Err(e) => {
                eprintln!("{}: 1 error(s):\n  filters: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        for warning in &built.warnings {
            eprintln!("{}: warning: {warning}", path.display());
        }
        // a managed model larger than its GPU can never be loaded
        for warning in infergate::engines::gpu_fit_warnings(&config.engines) {
            eprintln!("{}: warning: {warning}", path.display());
        }
        println!(
            "{}: OK ({} pools, {} model names, {} backends, {} managed engines; filters: [{}])",
            path.display(),
            config.pools.len(),
            models,
            config.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
            config.engines.models.len(),
            built.chain.names().join(", ")
        );
        return ExitCode::SUCCESS;
    }
    // return freed memory to the system from jemalloc's own thread, so an
    // idle gateway shrinks back after a burst of connections
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        log::warn!("jemalloc background purging is off ({e}); memory freed after a burst is kept until reused");
    }
    // until the reload service listens for SIGHUP, one must not stop us
    infergate::reload::ignore_sighup_until_ready();
    let options = infergate::server::RunOptions {
        config_path: Some(path),
        upgrade: cli.upgrade,
    };
    match infergate::server::run(config, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infergate: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse_role(role: &str) -> Option<infergate_filters::Role> {
    match role {
        "user" => Some(infergate_filters::Role::User),
        "admin" => Some(infergate_filters::Role::Admin),
        _ => {
            eprintln!("infergate: --role must be `user` or `admin`, not `{role}`");
            None
        }
    }
}

fn keys_new(user: &str, role: &str) -> ExitCode {
    if parse_role(role).is_none() {
        return ExitCode::from(2);
    }
    let (key, hashed) = infergate_filters::auth::new_api_key();
    let entry = serde_json::json!({"key": hashed, "user": user, "role": role, "enabled": true});
    println!("key:   {key}");
    println!("store: {hashed}");
    println!("entry: {entry}");
    println!(
        "Give the key to its user; put the entry (which holds only the hash) in the keys file."
    );
    ExitCode::SUCCESS
}

fn users_add(file: &std::path::Path, email: &str, role: &str, user_id: Option<u64>) -> ExitCode {
    let Some(role) = parse_role(role) else {
        return ExitCode::from(2);
    };
    let mut password = String::new();
    if std::io::stdin().lock().read_line(&mut password).is_err() {
        eprintln!("infergate: could not read the password from standard input");
        return ExitCode::from(2);
    }
    let password = password.trim_end_matches(['\n', '\r']);
    if password.len() < 8 {
        eprintln!(
            "infergate: the password (first line of standard input) must be at least 8 characters"
        );
        return ExitCode::from(2);
    }
    match infergate_filters::auth::add_user(file, email, password, role, user_id) {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).unwrap_or_else(|_| "user saved".to_string())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("infergate: {e}");
            ExitCode::from(1)
        }
    }
}
