fn main() -> std::process::ExitCode {
    streamer::cli::main()
}
