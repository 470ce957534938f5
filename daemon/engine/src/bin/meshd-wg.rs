//! `meshd-wg`: meshd's userspace WireGuard engine as a standalone program, used like
//! wireguard-go: `meshd-wg [-f|--foreground] IFACE`.

fn main() -> std::process::ExitCode {
    meshd_engine::cli::main()
}
