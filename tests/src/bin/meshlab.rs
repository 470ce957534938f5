//! `meshlab`: build the fleet lab and leave it running, step into its hosts, tear it down.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use meshlab::coord::{routes_toml, HOME_LAN, NAS_ROUTE, NAS_ROUTER};
use meshlab::{state, topology, Fleet, JoinMode, Lab, LabOpts, COORDINATOR, DAEMON_HOSTS, NAS};

#[derive(Parser)]
#[command(
    name = "meshlab",
    about = "The meshd fleet, rehearsed on one machine out of namespaces"
)]
struct Cli {
    /// Where labs are recorded (default $MESHLAB_STATE or /tmp/meshlab).
    #[arg(long, global = true)]
    state: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab and form the fleet from invitations (dock-load coordinates, the other
    /// daemon hosts join with tokens, the NAS joins as a static peer with wg-quick), wait
    /// until every pair pings over the mesh, leave it running.
    Up {
        /// Build the network only; do not write configs or start meshd.
        #[arg(long)]
        no_daemons: bool,
        /// The static fleet instead: generated keys and [[peer]] configs, no coordinator, no NAS.
        #[arg(long = "static")]
        static_fleet: bool,
        /// Joining hosts read their token from join_token_file at first start instead of
        /// `meshctl join -` (token on stdin) after meshd started.
        #[arg(long, conflicts_with = "static_fleet")]
        token_file: bool,
        /// Seconds to wait for every pair of daemon hosts to ping over the mesh.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
        /// Leave the lab running even if the mesh does not come up (to inspect it).
        #[arg(long)]
        keep: bool,
        /// The booted fleet: each daemon host a Debian 12 container booted with systemd, the
        /// package installed, the coordinator configured in /etc/meshd/meshd.toml, the others
        /// joined with `meshctl join -` (tests/README.md, "The booted fleet").
        #[arg(long, conflicts_with_all = ["static_fleet", "token_file", "no_daemons"])]
        boot: bool,
        /// With --boot: the package (default: $MESHLAB_DEB, else the newest
        /// target/debian/meshd_*.deb).
        #[arg(long, requires = "boot", value_name = "DEB")]
        deb: Option<PathBuf>,
    },
    /// Run a command inside a host (its network, mount and UTS namespaces), stdio inherited.
    Exec {
        /// Lab id (default: the one `meshlab up` left running).
        #[arg(long)]
        lab: Option<String>,
        host: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Remove a lab: its processes, namespaces and state directory.
    Down {
        #[arg(long)]
        lab: Option<String>,
    },
    /// Remove what crashed runs left behind (labs whose builder died, stray mlab-* netns).
    Cleanup {
        /// Also remove labs left running on purpose by `meshlab up`.
        #[arg(long)]
        all: bool,
    },
    /// List labs and their hosts.
    Status,
    /// Run a command in a VM of Debian 12's kernel (kernel WireGuard; tests/vm/prepare.sh),
    /// the host's root read-only inside, console streamed, its exit code passed on.
    Vm {
        /// Seconds for boot, command and power-off together; qemu is killed after
        /// [default: 300].
        #[arg(long)]
        timeout: Option<u64>,
        /// Guest memory in MiB [default: 1024].
        #[arg(long)]
        memory: Option<u32>,
        /// Guest CPUs [default: 1].
        #[arg(long)]
        cpus: Option<u32>,
        /// More environment for the command, NAME=VALUE (PATH, RUST_LOG, MESHLAB_* pass anyway).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// A host directory under /tmp, /var/tmp or /run to keep visible (those are tmpfs inside).
        #[arg(long, value_name = "DIR")]
        visible: Vec<PathBuf>,
        /// A kernel module to load besides the lab's list (drbd, loop, ext4, ...).
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Build a network-only lab owned by this process, print its id, hold it until stdin
    /// closes, then remove it (used by the suites to rehearse a crashed run).
    #[command(hide = true)]
    Hold {
        /// Hosts to build (default: all).
        #[arg(long, value_delimiter = ',')]
        hosts: Option<Vec<String>>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let root = cli.state.unwrap_or_else(state::state_root);
    let pick = |lab: Option<String>| -> Result<String> {
        match lab.or_else(|| std::env::var("MESHLAB_LAB").ok()) {
            Some(id) => Ok(id),
            None => state::current(&root),
        }
    };
    match cli.cmd {
        Cmd::Up {
            no_daemons,
            static_fleet,
            token_file,
            timeout,
            keep,
            boot,
            deb,
        } => {
            if boot {
                let deb = match deb {
                    Some(d) => d,
                    None => meshlab::boot::find_deb()?,
                };
                return up_boot(&root, &deb, Duration::from_secs(timeout), keep);
            }
            let mode = if no_daemons {
                UpMode::NoDaemons
            } else if static_fleet {
                UpMode::Static
            } else if token_file {
                UpMode::Managed(JoinMode::TokenFile)
            } else {
                UpMode::Managed(JoinMode::Command)
            };
            up(&root, mode, Duration::from_secs(timeout), keep)
        }
        Cmd::Exec { lab, host, cmd } => {
            let lab = Lab::attach(&root, &pick(lab)?)?;
            // A booted host: inside its container (its meshd, its systemd).
            if let Some(nspawn) = lab.container(&host) {
                let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
                let mut c = lab.in_container(&host, nspawn, &argv)?;
                c.stdin(std::process::Stdio::inherit());
                return Err(
                    anyhow::anyhow!(std::os::unix::process::CommandExt::exec(&mut c))
                        .context("exec nsenter"),
                );
            }
            Err(meshlab::lab::exec_replace(&lab, &host, &cmd))
        }
        Cmd::Down { lab } => {
            let id = pick(lab)?;
            Lab::attach(&root, &id)?.down()?;
            println!("lab {id} removed");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cleanup { all } => {
            let removed = meshlab::cleanup(&root, all)?;
            if removed.is_empty() {
                println!("nothing to clean up");
            }
            for r in removed {
                println!("removed {r}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => status(&root),
        Cmd::Vm {
            timeout,
            memory,
            cpus,
            env,
            visible,
            modules,
            cmd,
        } => {
            let mut opts = meshlab::VmOpts {
                visible,
                modules,
                ..meshlab::VmOpts::default()
            };
            opts.timeout = timeout.map_or(opts.timeout, Duration::from_secs);
            opts.memory_mib = memory.unwrap_or(opts.memory_mib);
            opts.cpus = cpus.unwrap_or(opts.cpus);
            vm(cmd, opts, env)
        }
        Cmd::Hold { hosts } => {
            let lab = Lab::build(LabOpts {
                hosts,
                state_root: root.clone(),
                ..LabOpts::default()
            })?;
            println!("{}", lab.id());
            std::io::Write::flush(&mut std::io::stdout())?;
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)?;
            lab.down()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `meshlab vm`: the console goes to stdout as it arrives; the exit code is the command's.
fn vm(cmd: Vec<String>, mut opts: meshlab::VmOpts, env: Vec<String>) -> Result<ExitCode> {
    for e in &env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("--env {e}: expected NAME=VALUE"))?;
        opts = opts.env(k, v);
    }
    let run = meshlab::run_in_vm(&cmd, &opts)?;
    eprintln!(
        "meshlab vm: boot {}, total {:.1} s",
        run.boot_secs
            .map_or_else(|| "did not finish".to_string(), |b| format!("{b:.1} s")),
        run.total_secs
    );
    match run.exit_code {
        Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        None => Err(run
            .check()
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("no exit code"))),
    }
}

#[derive(Clone, Copy)]
enum UpMode {
    NoDaemons,
    Static,
    Managed(JoinMode),
}

/// Start the static fleet; the hosts that must ping each other.
fn start_static(lab: &Lab) -> Result<Vec<String>> {
    let fleet = Fleet::standard(lab.bin_dir())?;
    lab.install_fleet(&fleet)?;
    for h in fleet.names() {
        let p = lab.start_meshd(h)?;
        println!(
            "meshd on {h}: pid {} (log {})",
            p.pid,
            lab.meshd_log(h).display()
        );
    }
    Ok(fleet.names().iter().map(|s| s.to_string()).collect())
}

/// Form the fleet from invitations; the hosts that must ping each other.
fn start_managed(lab: &Lab, mode: JoinMode) -> Result<Vec<String>> {
    let engine = meshlab::engine_command(lab.bin_dir());
    let p = lab.start_coordinator_with(&engine, &routes_toml(COORDINATOR))?;
    println!(
        "coordinator on {COORDINATOR}: meshd pid {} (log {})",
        p.pid,
        lab.meshd_log(COORDINATOR).display()
    );
    let mut hosts = vec![COORDINATOR.to_string()];
    for h in DAEMON_HOSTS.iter().filter(|h| **h != COORDINATOR) {
        let token = lab.invite(h, &[])?;
        println!(
            "$ meshctl invite {h}   -> {}...",
            &token[..token.len().min(24)]
        );
        let p = lab.join_host_with(h, &token, mode, &routes_toml(h))?;
        let how = match mode {
            JoinMode::TokenFile => "join_token_file",
            JoinMode::Command => "meshctl join",
        };
        println!(
            "{h} joined ({how}): meshd pid {} (log {})",
            p.pid,
            lab.meshd_log(h).display()
        );
        hosts.push(h.to_string());
    }
    let conf = lab.invite_nas()?;
    println!("$ meshctl invite {NAS} --static --endpoint ... --near ...   -> wg-quick config");
    lab.start_static_peer(NAS, &conf)?;
    println!("{NAS}: wg-quick up (wireguard-go)");
    hosts.push(NAS.to_string());
    // Routes are granted, not taken: dock-edge's NAS route is pending until approved.
    lab.approve_route(NAS_ROUTER, NAS_ROUTE, Duration::from_secs(60))?;
    println!("$ meshctl routes approve {NAS_ROUTER} {NAS_ROUTE}   (the hosts outside the home LAN accept {HOME_LAN})");
    Ok(hosts)
}

/// `meshlab up --boot`: the booted fleet (tests/README.md, "The booted fleet").
fn up_boot(
    root: &std::path::Path,
    deb: &std::path::Path,
    timeout: Duration,
    keep: bool,
) -> Result<ExitCode> {
    let opts = LabOpts {
        state_root: root.to_path_buf(),
        persistent: false,
        ..LabOpts::default()
    };
    let mut lab = Lab::build(opts).context("building the lab")?;
    let id = lab.id().to_owned();
    println!("lab {id} built under {}", lab.dir().display());
    let result = meshlab::boot::form_booted_fleet(&lab, deb, timeout).map(|(c, took)| {
        println!("{}", took.summary());
        match lab.container_ok(COORDINATOR, c[COORDINATOR], &["meshctl", "peers"]) {
            Ok(out) => println!("\n$ meshlab exec {COORDINATOR} meshctl peers\n{out}"),
            Err(e) => println!("\nmeshctl peers on {COORDINATOR} failed: {e:#}"),
        }
    });
    if let Err(e) = result {
        eprintln!("meshlab: {e:#}");
        for h in DAEMON_HOSTS {
            eprintln!(
                "  console of {h}: {}",
                lab.host_dir(h).join("console.log").display()
            );
        }
        if !keep {
            eprintln!("tearing the lab down (pass --keep to inspect it)");
            lab.down()?;
            return Ok(ExitCode::FAILURE);
        }
    }
    lab.persist()?;
    state::set_current(root, &id)?;
    println!(
        "\nlab {id} is running, booted.\n  meshlab exec dock-prod meshctl peers\n  meshlab exec dock-prod systemctl status meshd\n  meshlab exec dock-load journalctl -u meshd\n  meshlab down          # removes it"
    );
    Ok(ExitCode::SUCCESS)
}

fn up(root: &std::path::Path, mode: UpMode, timeout: Duration, keep: bool) -> Result<ExitCode> {
    let opts = LabOpts {
        state_root: root.to_path_buf(),
        persistent: false,
        ..LabOpts::default()
    };
    let mut lab = Lab::build(opts).context("building the lab")?;
    let id = lab.id().to_owned();
    println!("lab {id} built under {}", lab.dir().display());
    let mut ok = true;
    let managed = matches!(mode, UpMode::Managed(_));
    let started = match mode {
        UpMode::NoDaemons => Ok(Vec::new()),
        UpMode::Static => start_static(&lab),
        UpMode::Managed(m) => start_managed(&lab, m),
    };
    let result = started.and_then(|hosts| {
        if hosts.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
        println!(
            "waiting up to {timeout:?} for every pair of {} to ping over the mesh...",
            names.join(", ")
        );
        lab.wait_mesh_pings(&names, timeout)?;
        let n = names.len();
        println!("mesh is up: all {} ordered pairs ping", n * (n - 1));
        if managed {
            // The approved NAS route: a host outside the home LAN reaches the NAS's LAN
            // address through dock-edge.
            let nas_lan = std::net::Ipv4Addr::new(192, 168, 1, 20);
            meshlab::poll_until(
                timeout,
                &format!("dock-prod to ping the NAS's LAN address {nas_lan} through {NAS_ROUTER}"),
                || lab.ping("dock-prod", nas_lan),
            )?;
            println!("dock-prod reaches {nas_lan} through {NAS_ROUTER} (route approved)");
        }
        match lab.meshctl(COORDINATOR, &["peers"]) {
            Ok(out) => println!("\n$ meshlab exec {COORDINATOR} meshctl peers\n{out}"),
            Err(e) => println!("\nmeshctl peers on {COORDINATOR} failed: {e:#}"),
        }
        Ok(())
    });
    if let Err(e) = result {
        ok = false;
        eprintln!("meshlab: {e:#}");
        if let Ok(out) = lab.meshctl(COORDINATOR, &["peers"]) {
            eprintln!("\n$ meshlab exec {COORDINATOR} meshctl peers\n{out}");
        }
        for h in DAEMON_HOSTS {
            eprintln!("  log of {h}: {}", lab.meshd_log(h).display());
        }
        if !keep {
            eprintln!("tearing the lab down (pass --keep to inspect it)");
            lab.down()?;
            return Ok(ExitCode::FAILURE);
        }
    }
    lab.persist()?;
    state::set_current(root, &id)?;
    println!(
        "\nlab {id} is running.\n  meshlab exec dock-prod wg show wgmesh0\n  meshlab exec dock-prod meshctl peers\n  meshlab exec dock-load meshctl hosts\n  meshlab status\n  meshlab down          # removes it"
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(root: &std::path::Path) -> Result<ExitCode> {
    let current = state::current(root).ok();
    let labs = state::list_labs(root);
    if labs.is_empty() {
        println!("no labs under {}", root.display());
    }
    for (id, st) in labs {
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                println!("lab {id}: unreadable ({e:#})");
                continue;
            }
        };
        let mark = if current.as_deref() == Some(id.as_str()) {
            " (current)"
        } else {
            ""
        };
        let kind = if st.persistent {
            "left running by meshlab up"
        } else if st.owner.is_alive() {
            "owned by a running process"
        } else {
            "ORPHANED: meshlab cleanup removes it"
        };
        println!("lab {id}{mark}: {} - {kind}", st.dir.display());
        for (name, h) in &st.hosts {
            let alive = if h.holder.is_alive() { "up" } else { "GONE" };
            let addr = h.addr.map(|a| a.to_string()).unwrap_or_default();
            let mesh = topology::mesh_addr(name)
                .map(|a| a.to_string())
                .unwrap_or_default();
            let procs = st
                .spawned
                .iter()
                .filter(|s| &s.host == name && s.proc.is_alive())
                .map(|s| {
                    format!(
                        "{}[{}]",
                        s.cmd
                            .first()
                            .map(|c| c.rsplit('/').next().unwrap_or(c))
                            .unwrap_or(""),
                        s.proc.pid
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            let role = format!("{:?}", h.role).to_lowercase();
            println!(
                "  {name:<12} {alive:<4} {role:<7} {addr:<16} {mesh:<12} netns {} {procs}",
                h.netns
            );
        }
    }
    for n in state::our_netns_names() {
        if let Some(id) = state::id_of_netns(&n) {
            if !root.join(id).exists() {
                println!("stray netns {n} (no lab record): meshlab cleanup removes it");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
