//! USER resolution through an image's /etc/passwd and /etc/group, as Docker does it:
//! `name`, `uid`, `name:group`, `uid:gid`.

use std::path::Path;

use lcache_confine::Root;

/// A resolved user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Why a USER or `--chown` value does not resolve.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user name the image does not know.
    #[error("user '{0}' is not in the image's /etc/passwd: use a numeric uid or create the user first")]
    UnknownUser(String),
    /// A group name the image does not know.
    #[error("group '{0}' is not in the image's /etc/group: use a numeric gid")]
    UnknownGroup(String),
}

/// The text of an image file, read beneath the image's root: a symlinked /etc/passwd
/// resolves inside the image, never to the host's file.
fn image_file(rootfs: &Path, rel: &str) -> Option<String> {
    let mut f = Root::open(rootfs).ok()?.open_file(Path::new(rel), true).ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).ok()?;
    Some(text)
}

fn lookup(rootfs: &Path, file: &str, name: &str) -> Option<(u32, u32)> {
    let text = image_file(rootfs, file)?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name)
            .then(|| (f[2].parse().ok(), f[3].parse().ok()))
            .and_then(|(a, b)| Some((a?, b.unwrap_or(0))))
    })
}

/// Resolves `spec` against the image root `rootfs`; an empty spec is root.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<UserIds, UserError> {
    if spec.is_empty() {
        return Ok(UserIds { uid: 0, gid: 0 });
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, lookup_by_uid(rootfs, uid).unwrap_or(0)),
        Err(_) => lookup(rootfs, "etc/passwd", user).ok_or_else(|| UserError::UnknownUser(user.to_string()))?,
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(rootfs, "etc/group", g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
    };
    Ok(UserIds { uid, gid })
}

fn lookup_by_uid(rootfs: &Path, uid: u32) -> Option<u32> {
    let text = image_file(rootfs, "etc/passwd")?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[2].parse::<u32>().ok() == Some(uid))
            .then(|| f[3].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups_resolve() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(
            resolve_user(d.path(), "nobody").unwrap(),
            UserIds { uid: 65534, gid: 65534 }
        );
        assert_eq!(
            resolve_user(d.path(), "app:staff").unwrap(),
            UserIds { uid: 1000, gid: 50 }
        );
        assert_eq!(
            resolve_user(d.path(), "1000").unwrap(),
            UserIds { uid: 1000, gid: 1001 }
        );
        assert_eq!(resolve_user(d.path(), "42:7").unwrap(), UserIds { uid: 42, gid: 7 });
        assert!(resolve_user(d.path(), "ghost")
            .unwrap_err()
            .to_string()
            .contains("not in the image's /etc/passwd"));
    }

    #[test]
    fn a_symlinked_passwd_resolves_inside_the_image_not_on_the_host() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("usr/lib/passwd"), "app:x:4242:4343::/:/bin/sh\n").unwrap();
        // Absolute, as images make them: on the host it would name the host's /usr/lib/passwd.
        std::os::unix::fs::symlink("/usr/lib/passwd", d.path().join("etc/passwd")).unwrap();
        assert_eq!(resolve_user(d.path(), "app").unwrap(), UserIds { uid: 4242, gid: 4343 });
    }
}
