//! The `spinfer` command line (see `spinfer --help`).

mod cli;

fn main() {
    let mut args = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(a) => {
                eprintln!("error: argument {a:?} is not valid UTF-8");
                std::process::exit(2);
            }
        }
    }
    std::process::exit(cli::run(args));
}
