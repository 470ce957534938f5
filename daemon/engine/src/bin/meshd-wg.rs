//! `meshd-wg`: meshd's userspace WireGuard engine as a standalone program, used like
//! wireguard-go: `meshd-wg [-f|--foreground] IFACE`.

/// meshd-wg(8) less what clap knows (see meshd_docgen::man_page).
const MAN_TEMPLATE: &str = include_str!("../../../../packaging/man/meshd-wg.8.in");

fn main() -> std::process::ExitCode {
    if let Some(dir) = meshd_docgen::requested() {
        return meshd_docgen::generate(meshd_engine::cli::command(), MAN_TEMPLATE, &[], &dir);
    }
    meshd_engine::cli::main()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_renders_without_warnings() {
        let page =
            meshd_docgen::man_page(meshd_engine::cli::command(), MAN_TEMPLATE).expect("renders");
        assert!(page.contains("\\-\\-foreground"), "{page}");
        let warnings = meshd_docgen::groff_warnings(&page).expect("groff runs");
        assert!(warnings.is_empty(), "{warnings}");
    }
}
