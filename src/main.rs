//! The `spinfer` command line.

fn main() {
    eprintln!("spinfer: not implemented yet");
    std::process::exit(2);
}
