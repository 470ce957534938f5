//! `meshd-wg`: meshd's userspace WireGuard engine as a standalone program, used like
//! wireguard-go: `meshd-wg [-f|--foreground] IFACE`.

fn main() -> std::process::ExitCode {
    if let Some(dir) = meshd_docgen::requested() {
        return meshd_docgen::generate(meshd_engine::cli::command(), &dir);
    }
    meshd_engine::cli::main()
}
