//! RUN in a real OCI runtime (runc by default): an overlay of the parent's snapshots with a
//! fresh upper directory as the root, a bundle made from the runtime's own default spec, and
//! the step's argv, env, cwd, user and network. What the step wrote is the upper directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use std::collections::HashSet;

use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxNamespaceType, Mount, MountBuilder, Root as SpecRoot, Spec,
};

use crate::overlay_mount::OverlayMount;
use crate::user_lookup::resolve_user;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The runtime binary (`runc`, `crun`, or a path).
    pub runtime: String,
    /// Parent snapshots, top first.
    pub lowers: Vec<PathBuf>,
    /// The command.
    pub argv: Vec<String>,
    /// `NAME=value` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// USER spec (resolved through the image's /etc/passwd).
    pub user: String,
    /// `--network=none`: an empty network namespace (otherwise the host's, as BuildKit).
    pub network_none: bool,
    /// `RUN --mount`s, prepared.
    pub mounts: Vec<PreparedMount>,
}

/// A `RUN --mount` ready for the runtime.
#[derive(Debug, Clone)]
pub enum PreparedMount {
    /// A host directory or file (a cache's directory, a secret's file).
    Bind {
        /// On the host.
        source: PathBuf,
        /// In the container.
        target: String,
        /// Mounted read-only.
        readonly: bool,
    },
    /// An empty in-memory filesystem.
    Tmpfs {
        /// In the container.
        target: String,
    },
}

/// Why a RUN failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command exited non-zero.
    #[error("the command exited with code {code}")]
    Exit {
        /// Exit code.
        code: i32,
        /// Its last output lines.
        last_output: Vec<String>,
    },
    /// The step could not be started.
    #[error("{0}")]
    Setup(String),
}

static CONTAINER_SEQ: AtomicU64 = AtomicU64::new(0);

/// The hostname a RUN sees, as in BuildKit.
pub const HOSTNAME: &str = "buildkitsandbox";

/// Docker's default capability set (runc's own default is much smaller: `apt-get`'s
/// privilege drop, `chown` and `useradd` need these).
const DOCKER_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::NetRaw,
    Capability::SysChroot,
    Capability::Mknod,
    Capability::AuditWrite,
    Capability::Setfcap,
];

/// `/etc/hosts` as BuildKit writes it for a RUN.
const HOSTS: &str = "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// A read-only bind mount of a generated file, as BuildKit mounts `/etc/hosts` and
/// `/etc/resolv.conf` (never part of the layer).
fn ro_file_mount(source: &Path, destination: &str) -> Result<Mount, RunError> {
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(["rbind", "ro", "nosuid", "nodev", "noexec"].map(String::from).to_vec())
        .build()
        .map_err(|e| RunError::Setup(format!("cannot describe the {destination} mount: {e}")))
}

/// Writes the files a RUN sees as `/etc/hosts` and `/etc/resolv.conf` into `dir`: BuildKit's
/// hosts, and the host's resolver configuration (the RUN shares the host's network).
fn write_network_files(dir: &Path) -> Result<(PathBuf, PathBuf), RunError> {
    let hosts = dir.join("hosts");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&hosts, HOSTS).map_err(setup("cannot write the RUN's /etc/hosts"))?;
    let conf = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    std::fs::write(&resolv, conf).map_err(setup("cannot write the RUN's /etc/resolv.conf"))?;
    Ok((hosts, resolv))
}

fn setup(what: &str) -> impl Fn(std::io::Error) -> RunError + '_ {
    move |e| RunError::Setup(format!("{what}: {e}"))
}

/// Runs `spec` with `work` as scratch space; returns the upper directory (the step's
/// changes). `output` receives each output line as it comes.
pub fn run_step(spec: &RunSpec, work: &Path, output: &mut dyn FnMut(&str)) -> Result<PathBuf, RunError> {
    let (upper, ovl_work, rootfs, bundle, empty) = (
        work.join("upper"),
        work.join("ovl-work"),
        work.join("rootfs"),
        work.join("bundle"),
        work.join("empty"),
    );
    for d in [&upper, &ovl_work, &bundle, &empty] {
        std::fs::create_dir_all(d).map_err(setup("cannot make the step's directories"))?;
    }
    let mount = OverlayMount::mount(&spec.lowers, Some((&upper, &ovl_work)), &rootfs, &empty)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let ids = resolve_user(mount.path(), &spec.user).map_err(|e| RunError::Setup(format!("USER: {e}")))?;
    let gen = Command::new(&spec.runtime)
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .map_err(|e| {
            RunError::Setup(format!(
                "cannot run the OCI runtime '{}': {e} — install runc (apt-get install runc) or pass --runtime PATH",
                spec.runtime
            ))
        })?;
    if !gen.status.success() {
        return Err(RunError::Setup(format!(
            "'{} spec' failed: {}",
            spec.runtime,
            String::from_utf8_lossy(&gen.stderr).trim()
        )));
    }
    // The runtime's own default spec, adjusted through oci-spec's typed runtime spec.
    let cfg_path = bundle.join("config.json");
    let mut cfg =
        Spec::load(&cfg_path).map_err(|e| RunError::Setup(format!("cannot read the runtime's default spec: {e}")))?;
    let mut process = cfg.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(spec.argv.clone()));
    process.set_env(Some(spec.env.clone()));
    process.set_cwd(PathBuf::from(if spec.cwd.is_empty() { "/" } else { &spec.cwd }));
    let mut user = process.user().clone();
    user.set_uid(ids.uid);
    user.set_gid(ids.gid);
    process.set_user(user);
    let caps: HashSet<Capability> = DOCKER_CAPABILITIES.into_iter().collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .inheritable(HashSet::new())
            .ambient(HashSet::new())
            .build()
            .map_err(|e| RunError::Setup(format!("cannot describe the capabilities: {e}")))?,
    ));
    // As Docker: setuid programs (su, sudo) work, and limits are inherited, not runc's 1024 files.
    process.set_no_new_privileges(Some(false));
    process.set_rlimits(None);
    cfg.set_process(Some(process));
    let (hosts, resolv) = write_network_files(work)?;
    let mut mounts = cfg.mounts().clone().unwrap_or_default();
    mounts.push(ro_file_mount(&hosts, "/etc/hosts")?);
    mounts.push(ro_file_mount(&resolv, "/etc/resolv.conf")?);
    for m in &spec.mounts {
        let built = match m {
            PreparedMount::Bind {
                source,
                target,
                readonly,
            } => MountBuilder::default()
                .destination(target)
                .typ("bind")
                .source(source)
                .options(vec![
                    "rbind".to_string(),
                    if *readonly { "ro" } else { "rw" }.to_string(),
                ])
                .build(),
            PreparedMount::Tmpfs { target } => MountBuilder::default()
                .destination(target)
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec!["nosuid".to_string(), "nodev".to_string()])
                .build(),
        };
        mounts.push(built.map_err(|e| RunError::Setup(format!("cannot describe a --mount: {e}")))?);
    }
    cfg.set_mounts(Some(mounts));
    let mut root = SpecRoot::default();
    root.set_path(mount.path().to_path_buf());
    root.set_readonly(Some(false));
    cfg.set_root(Some(root));
    cfg.set_hostname(Some(HOSTNAME.into()));
    if !spec.network_none {
        if let Some(ns) = cfg.linux_mut().as_mut().and_then(|l| l.namespaces_mut().as_mut()) {
            ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
    }
    cfg.save(&cfg_path)
        .map_err(|e| RunError::Setup(format!("cannot write the bundle's spec: {e}")))?;

    let id = format!(
        "lcache-{}-{}",
        std::process::id(),
        CONTAINER_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut child = Command::new(&spec.runtime)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(setup("cannot start the runtime"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as _),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut last = std::collections::VecDeque::new();
    for line in rx {
        output(&line);
        if last.len() == 20 {
            last.pop_front();
        }
        last.push_back(line);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(setup("cannot wait for the runtime"))?;
    drop(mount);
    if !status.success() {
        return Err(RunError::Exit {
            code: status.code().unwrap_or(-1),
            last_output: last.into(),
        });
    }
    Ok(upper)
}

/// The argv of a RUN: heredoc bodies follow the command so the shell reads them itself; a
/// command that is only a heredoc (`RUN <<EOF`) runs its body as the script, as BuildKit does.
pub fn argv_with_heredocs(argv: &[String], heredocs: &[(String, String)]) -> Vec<String> {
    if heredocs.is_empty() || argv.is_empty() {
        return argv.to_vec();
    }
    let mut v = argv.to_vec();
    if let Some(last) = v.last_mut() {
        let only_marker =
            last.trim().starts_with("<<") && !last.trim().contains(char::is_whitespace) && heredocs.len() == 1;
        if only_marker {
            *last = heredocs[0].1.clone();
            return v;
        }
        for (delim, body) in heredocs {
            last.push('\n');
            last.push_str(body);
            last.push_str(delim);
        }
        last.push('\n');
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heredoc_bodies_follow_the_command_for_the_shell() {
        let argv = vec!["/bin/sh".into(), "-c".into(), "cat <<EOF > /f".into()];
        let v = argv_with_heredocs(&argv, &[("EOF".into(), "hello\n".into())]);
        assert_eq!(v[2], "cat <<EOF > /f\nhello\nEOF\n");
        let only = vec!["/bin/sh".into(), "-c".into(), "<<EOF".into()];
        assert_eq!(
            argv_with_heredocs(&only, &[("EOF".into(), "echo hi\n".into())])[2],
            "echo hi\n"
        );
    }
}
