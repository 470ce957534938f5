//! The one way meshd writes a file: [`write_file`].
//!
//! Every writer in meshd (state files, keys, integration outputs, /etc/hosts) goes through
//! here, because some of the directories meshd writes into belong to someone else (the
//! Prometheus file_sd directory is the `prometheus` user's) and root must not be steered into
//! truncating or chowning a file outside them. The sequence:
//!
//! 1. the parent directory is opened once (`O_DIRECTORY|O_NOFOLLOW`; a symlinked parent is
//!    followed only when root or meshd's own user owns the link) and every later step works
//!    relative to that descriptor, so swapping a path component mid-write changes nothing;
//! 2. the target is looked at without following it: a symbolic link or anything but a
//!    regular file is refused with an error naming the path;
//! 3. a temp file with a random name (`.NAME.tmp.<16 hex digits>`) is created with
//!    `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted symlink or file of that name makes the create fail;
//!    a fresh name is tried);
//! 4. the content is written, then mode and owner are set on the descriptor (`fchmod`,
//!    `fchown`), never through a path, then the file is fsynced;
//! 5. it is renamed over the target (or linked, when the target must not exist yet) and the
//!    directory is fsynced.
//!
//! A file that cannot be replaced by a rename (a bind-mounted /etc/hosts: EBUSY/EXDEV; a
//! writable file in a read-only directory: EROFS) may be written in place when the caller
//! allows it ([`WriteOptions::in_place_fallback`]), opened with `O_NOFOLLOW` as well.
//!
//! The process umask does not matter: modes are always set explicitly (the packaged unit runs
//! meshd with `UMask=0077`).

pub mod keyfile;
pub mod state;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, Mode, SFlag};
use nix::unistd::{self, UnlinkatFlags};
use rand_core::{OsRng, RngCore as _};

/// What mode and owner the written file gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Exactly this mode, owned by meshd's user (state files, keys: 0600).
    Fixed { mode: u32 },
    /// An existing file's mode and owner carry over (looked up without following a link);
    /// a new file gets `mode`, owned by meshd's user. For integration outputs another
    /// program reads (a file_sd file the operator chowned to prometheus).
    KeepExisting { mode: u32 },
    /// This mode and owner, set on the descriptor.
    Explicit { mode: u32, uid: u32, gid: u32 },
}

/// How [`write_file`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    pub ownership: Ownership,
    /// Mode of parent directories that do not exist yet (set explicitly, whatever the umask).
    pub dir_mode: u32,
    /// `false`: refuse when the target exists already (a new key must never replace one).
    pub replace: bool,
    /// Write an existing file in place when it cannot be replaced by a rename (see the module
    /// documentation).
    pub in_place_fallback: bool,
}

impl WriteOptions {
    /// meshd's own files: 0600 in a 0700 directory.
    pub const PRIVATE: WriteOptions = WriteOptions {
        ownership: Ownership::Fixed { mode: 0o600 },
        dir_mode: 0o700,
        replace: true,
        in_place_fallback: false,
    };

    /// Files other programs read (integration outputs): an existing file keeps its mode and
    /// owner, a new one is 0644 in 0755 directories; written in place when a rename cannot
    /// replace it.
    pub const SHARED: WriteOptions = WriteOptions {
        ownership: Ownership::KeepExisting { mode: 0o644 },
        dir_mode: 0o755,
        replace: true,
        in_place_fallback: true,
    };
}

/// The temp file name prefix for `name` (`.NAME.tmp.`); a random suffix follows. Exposed so a
/// recovery after a crash can find leftovers.
pub fn temp_prefix(name: &OsStr) -> OsString {
    let mut p = OsString::from(".");
    p.push(name);
    p.push(".tmp.");
    p
}

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("refusing to write {}: {why}", path.display()),
    )
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn split(path: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| refused(path, "the path names no file"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

/// The uid meshd runs as (a link it or root owns is trusted).
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == unistd::geteuid().as_raw()
}

/// Create `dir` and its missing ancestors with `mode` (chmod after mkdir: the umask may have
/// narrowed it).
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        // A symlink to a directory: open_dir decides whether it is followed.
        Ok(m) if m.file_type().is_symlink() => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent, mode)?;
    }
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            let fd = fcntl::open(
                dir,
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
                Mode::empty(),
            )
            .map_err(errno)?;
            stat::fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(errno)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        // Unchanged (the caller names the path; EROFS must stay recognisable).
        Err(e) => Err(e),
    }
}

/// Open the directory `dir` for `*at` calls. Its last component may be a symlink only when
/// root or meshd's user owns the link (a link planted by the owner of the directory above,
/// pointing at /etc, is refused).
fn open_dir(dir: &Path, target: &Path) -> io::Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    match fcntl::open(dir, flags | OFlag::O_NOFOLLOW, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let meta = std::fs::symlink_metadata(dir)?;
            if !meta.file_type().is_symlink() {
                return Err(refused(
                    target,
                    &format!("{} is not a directory", dir.display()),
                ));
            }
            if !trusted_owner(meta.uid()) {
                return Err(refused(
                    target,
                    &format!(
                        "its directory {} is a symbolic link owned by uid {} (not root): \
                         replace the link with a directory",
                        dir.display(),
                        meta.uid()
                    ),
                ));
            }
            fcntl::open(dir, flags, Mode::empty()).map_err(errno)
        }
        Err(e) => Err(errno(e)),
    }
}

/// What is at `name` in `dirfd`, without following a link: `None` when nothing.
fn existing(dirfd: &OwnedFd, name: &OsStr, path: &Path) -> io::Result<Option<stat::FileStat>> {
    match stat::fstatat(dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFLNK {
                return Err(refused(
                    path,
                    "it is a symbolic link (meshd never writes through one: remove the link, \
                     and check who planted it)",
                ));
            }
            if kind != SFlag::S_IFREG {
                return Err(refused(path, "it is not a regular file"));
            }
            Ok(Some(st))
        }
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

#[cfg(test)]
thread_local! {
    /// The steps of the last writes on this thread (the durability test reads them).
    static STEPS: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn step(_name: &'static str) {
    #[cfg(test)]
    STEPS.with(|s| s.borrow_mut().push(_name));
}

/// Create a temp file next to `name` in `dirfd`: a random name, `O_EXCL|O_NOFOLLOW`, mode 0600
/// until the final mode is set on the descriptor.
fn create_temp(dirfd: &OwnedFd, name: &OsStr, path: &Path) -> io::Result<(File, OsString)> {
    let prefix = temp_prefix(name);
    let mut last = Errno::EEXIST;
    for _ in 0..16 {
        let mut tmp = prefix.clone();
        tmp.push(format!("{:016x}", OsRng.next_u64()));
        match fcntl::openat(
            dirfd,
            tmp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => {
                step("create_excl");
                return Ok((File::from(fd), tmp));
            }
            // Someone planted this name (a file or a link): try another.
            Err(e @ (Errno::EEXIST | Errno::ELOOP)) => {
                tracing::warn!(path = %path.display(), temp = %String::from_utf8_lossy(tmp.as_bytes()), "a temp file name is taken; trying another");
                last = e;
            }
            Err(e) => return Err(errno(e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "cannot create a temp file next to {}: 16 random names were taken ({last})",
            path.display()
        ),
    ))
}

/// Write `content` to `path` as described in the module documentation.
pub fn write_file(path: &Path, content: &[u8], opts: WriteOptions) -> io::Result<()> {
    // fsyncs: off the async workers (see crate::runtime::blocking).
    crate::runtime::blocking::run(|| write_file_now(path, content, opts))
}

fn write_file_now(path: &Path, content: &[u8], opts: WriteOptions) -> io::Result<()> {
    let (dir, name) = split(path)?;
    create_dir_all(dir, opts.dir_mode)?;
    let dirfd = open_dir(dir, path)?;
    let old = existing(&dirfd, name, path)?;
    if old.is_some() && !opts.replace {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists already; meshd does not replace it",
                path.display()
            ),
        ));
    }
    let (mode, owner) = match opts.ownership {
        Ownership::Fixed { mode } => (mode, None),
        Ownership::KeepExisting { mode } => match &old {
            // Permission bits only: a file meshd writes is never setuid, setgid or sticky,
            // whatever the owner of the directory left there.
            Some(st) => (st.st_mode & 0o777, Some((st.st_uid, st.st_gid))),
            None => (mode, None),
        },
        Ownership::Explicit { mode, uid, gid } => (mode, Some((uid, gid))),
    };
    let (mut file, tmp) = match create_temp(&dirfd, name, path) {
        Ok(t) => t,
        Err(e) if e.raw_os_error() == Some(libc::EROFS) && old.is_some() => {
            if opts.in_place_fallback {
                tracing::debug!(path = %path.display(), "read-only directory: writing in place");
                return write_in_place(&dirfd, name, path, content);
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let result = (|| -> io::Result<()> {
        file.write_all(content)?;
        step("write");
        stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode)).map_err(errno)?;
        step("fchmod");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            step("fchown");
        }
        file.sync_all()?;
        step("fsync_file");
        drop(file);
        if opts.replace {
            match fcntl::renameat(&dirfd, tmp.as_os_str(), &dirfd, name) {
                Ok(()) => step("rename"),
                Err(e @ (Errno::EBUSY | Errno::EXDEV)) if opts.in_place_fallback => {
                    // A bind-mounted file (a container's /etc/hosts) cannot be replaced.
                    tracing::debug!(path = %path.display(), error = %e, "bind-mounted file: writing in place");
                    remove_temp(&dirfd, &tmp);
                    return write_in_place(&dirfd, name, path, content);
                }
                Err(e) => return Err(errno(e)),
            }
        } else {
            // link(2) fails when the target appeared meanwhile.
            unistd::linkat(&dirfd, tmp.as_os_str(), &dirfd, name, AtFlags::empty())
                .map_err(errno)?;
            step("link");
            remove_temp(&dirfd, &tmp);
        }
        sync_dirfd(&dirfd)?;
        step("fsync_dir");
        Ok(())
    })();
    if result.is_err() {
        remove_temp(&dirfd, &tmp);
    }
    result
}

fn remove_temp(dirfd: &OwnedFd, tmp: &OsStr) {
    match unistd::unlinkat(dirfd, tmp, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => {
            tracing::warn!(temp = %String::from_utf8_lossy(tmp.as_bytes()), error = %e, "cannot remove a temp file")
        }
    }
}

fn sync_dirfd(dirfd: &OwnedFd) -> io::Result<()> {
    match unistd::fsync(dirfd) {
        // Some file systems cannot fsync a directory; the rename is as durable as they allow.
        Ok(()) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

/// fsync the directory `dir` (after a rename or unlink done elsewhere).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    crate::runtime::blocking::run(|| sync_dir_now(dir))
}

fn sync_dir_now(dir: &Path) -> io::Result<()> {
    let fd = fcntl::open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(errno)?;
    sync_dirfd(&fd)
}

/// Overwrite an existing regular file in place (never through a link): write the new content
/// over the old, cut it to length, fsync. Not atomic, but a reader never sees an empty file.
fn write_in_place(dirfd: &OwnedFd, name: &OsStr, path: &Path, content: &[u8]) -> io::Result<()> {
    let fd = fcntl::openat(
        dirfd,
        name,
        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => refused(path, "it is a symbolic link"),
        e => errno(e),
    })?;
    let mut f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(refused(path, "it is not a regular file"));
    }
    f.write_all(content)?;
    f.set_len(content.len() as u64)?;
    f.sync_all()
}

/// Read `path` as text without following a symbolic link in its last component (`None` when
/// it does not exist). A link is refused with an error naming it.
pub fn read_to_string_nofollow(path: &Path) -> io::Result<Option<String>> {
    let fd = match fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "refusing to read {}: it is a symbolic link (meshd never follows one to a \
                     file it manages: remove the link, and check who planted it)",
                    path.display()
                ),
            ))
        }
        Err(e) => return Err(errno(e)),
    };
    let mut f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to read {}: not a regular file", path.display()),
        ));
    }
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(Some(s))
}

/// Read a file holding a secret (a join token): not a symbolic link, a regular file owned by
/// root and accessible to root only ([`mesh_proto::config::secret_file::check_secret_file`]).
pub fn read_secret_file(path: &Path) -> io::Result<String> {
    let fd = fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing the token file {}: it is a symbolic link",
                path.display()
            ),
        ),
        e => io::Error::new(
            errno(e).kind(),
            format!("cannot read {}: {e}", path.display()),
        ),
    })?;
    let mut f = File::from(fd);
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing the token file {}: not a regular file",
                path.display()
            ),
        ));
    }
    mesh_proto::config::secret_file::check_secret_file(
        &path.display().to_string(),
        meta.mode(),
        meta.uid(),
        meta.len(),
    )
    .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?;
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

/// The path of a temp file [`write_file`] would use for `path` (tests, recovery).
pub fn temp_path_prefix(path: &Path) -> Option<PathBuf> {
    let (dir, name) = split(path).ok()?;
    Some(dir.join(temp_prefix(name)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn private_file_is_0600_in_a_0700_directory_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/state.json");
        write_file(&p, b"one", WriteOptions::PRIVATE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(
            fs::metadata(d.path().join("a")).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::metadata(d.path().join("a/b")).unwrap().mode() & 0o777,
            0o700
        );
        // A shared file in a new directory is readable by others even under umask 077
        // (directories get their mode by chmod, not from mkdir's mode & ~umask).
        let q = d.path().join("c/out.json");
        write_file(&q, b"x", WriteOptions::SHARED).unwrap();
        assert_eq!(fs::metadata(&q).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(
            fs::metadata(d.path().join("c")).unwrap().mode() & 0o777,
            0o755
        );
        write_file(&p, b"two", WriteOptions::PRIVATE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d.path().join("a/b")), vec!["state.json"]);
    }

    #[test]
    fn a_symlinked_target_is_refused_and_its_victim_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("shadow");
        fs::write(&victim, "secret\n").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o640)).unwrap();
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        let target = out.join("targets.json");
        symlink(&victim, &target).unwrap();
        for opts in [WriteOptions::SHARED, WriteOptions::PRIVATE] {
            let e = write_file(&target, b"[]\n", opts).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("symbolic link"), "{msg}");
            assert!(msg.contains(&target.display().to_string()), "{msg}");
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "secret\n");
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o640);
        // The link is still there (not replaced), no temp file left.
        assert!(fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(names(&out), vec!["targets.json"]);
        // Reading through it is refused too.
        let e = read_to_string_nofollow(&target).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn planted_temp_names_are_never_followed() {
        // The attacker cannot guess the random name, but even a planted name that matched
        // would fail O_EXCL: plant links at many candidate names and at the old fixed names.
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "keep\n").unwrap();
        let out = d.path().join("out");
        fs::create_dir(&out).unwrap();
        let target = out.join("targets.json");
        fs::write(&target, "old\n").unwrap();
        for name in [
            format!(".targets.json.meshd-{}.tmp", std::process::id()),
            format!(".targets.json.tmp.{}", std::process::id()),
        ] {
            symlink(&victim, out.join(name)).unwrap();
        }
        // Force the create to collide: a link named exactly like the first candidate cannot be
        // arranged from outside, so check the primitive directly.
        let dirfd = open_dir(&out, &target).unwrap();
        let planted = OsString::from(".targets.json.tmp.planted");
        symlink(&victim, out.join(&planted)).unwrap();
        let e = fcntl::openat(
            &dirfd,
            planted.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap_err();
        assert_eq!(e, Errno::EEXIST);
        write_file(&target, b"new\n", WriteOptions::SHARED).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "new\n");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep\n");
        assert_eq!(names(&out).len(), 4, "{:?}", names(&out));
    }

    #[test]
    fn a_symlinked_directory_owned_by_someone_else_is_refused() {
        // Owned by us here (tests run as one user), so trusted; the refusal needs another
        // owner: run as root, chown the link to nobody.
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        symlink(&real, &link).unwrap();
        write_file(&link.join("f"), b"x", WriteOptions::SHARED).unwrap();
        assert_eq!(fs::read(real.join("f")).unwrap(), b"x");
        if !unistd::geteuid().is_root() {
            eprintln!("skipped: the untrusted-link half needs root (to chown the link)");
            return;
        }
        let link2 = d.path().join("link2");
        symlink(&real, &link2).unwrap();
        unistd::fchownat(
            fcntl::AT_FDCWD,
            &link2,
            Some(unistd::Uid::from_raw(65534)),
            Some(unistd::Gid::from_raw(65534)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let e = write_file(&link2.join("g"), b"x", WriteOptions::SHARED).unwrap_err();
        assert!(
            e.to_string().contains("symbolic link owned by uid 65534"),
            "{e}"
        );
        assert!(!real.join("g").exists());
    }

    #[test]
    fn mode_and_owner_are_set_on_the_descriptor() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, "old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        write_file(&p, b"new", WriteOptions::SHARED).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o6755)).unwrap();
        write_file(&p, b"new", WriteOptions::SHARED).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o755);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let uid = unistd::geteuid().as_raw();
        let gid = unistd::getegid().as_raw();
        let opts = WriteOptions {
            ownership: Ownership::Explicit {
                mode: 0o604,
                uid,
                gid,
            },
            ..WriteOptions::PRIVATE
        };
        STEPS.with(|s| s.borrow_mut().clear());
        write_file(&p, b"newer", opts).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o604, uid, gid));
        if unistd::geteuid().is_root() {
            let opts = WriteOptions {
                ownership: Ownership::Explicit {
                    mode: 0o600,
                    uid: 65534,
                    gid: 65534,
                },
                ..WriteOptions::PRIVATE
            };
            write_file(&p, b"theirs", opts).unwrap();
            let m = fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534));
        } else {
            eprintln!("skipped: chown to another user needs root");
        }
    }

    #[test]
    fn durability_path_is_create_write_mode_fsync_rename_fsync_dir() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        STEPS.with(|s| s.borrow_mut().clear());
        write_file(&p, b"x", WriteOptions::PRIVATE).unwrap();
        let steps = STEPS.with(|s| s.borrow().clone());
        assert_eq!(
            steps,
            vec![
                "create_excl",
                "write",
                "fchmod",
                "fsync_file",
                "rename",
                "fsync_dir"
            ]
        );
        // No-replace: link instead of rename, and an existing target is refused.
        let q = d.path().join("key");
        STEPS.with(|s| s.borrow_mut().clear());
        let opts = WriteOptions {
            replace: false,
            ..WriteOptions::PRIVATE
        };
        write_file(&q, b"k1", opts).unwrap();
        let steps = STEPS.with(|s| s.borrow().clone());
        assert_eq!(
            steps,
            vec![
                "create_excl",
                "write",
                "fchmod",
                "fsync_file",
                "link",
                "fsync_dir"
            ]
        );
        let e = write_file(&q, b"k2", opts).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&q).unwrap(), b"k1");
        assert_eq!(names(d.path()), vec!["f", "key"]);
    }

    #[test]
    fn secret_files_must_be_private_and_not_links() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("join.token");
        fs::write(&p, "meshd1.x\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_file(&p).unwrap_err();
        if unistd::geteuid().is_root() {
            assert!(e.to_string().contains("chmod 600"), "{e}");
        } else {
            // Only root's files are trusted; ours are refused by owner before the mode counts.
            assert!(e.to_string().contains("not root"), "{e}");
            eprintln!(
                "skipped: the mode half needs root (a file not owned by root is refused first)"
            );
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let l = d.path().join("link");
        symlink(&p, &l).unwrap();
        let e = read_secret_file(&l).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        if unistd::geteuid().is_root() {
            assert_eq!(read_secret_file(&p).unwrap(), "meshd1.x\n");
        }
    }

    #[test]
    fn a_directory_or_fifo_at_the_target_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::create_dir(&p).unwrap();
        let e = write_file(&p, b"x", WriteOptions::SHARED).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let q = d.path().join("fifo");
        nix::unistd::mkfifo(&q, Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_to_string_nofollow(&q).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
