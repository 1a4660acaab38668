//! USER resolution through an image's /etc/passwd and /etc/group, as Docker does it:
//! `name`, `uid`, `name:group`, `uid:gid`.

use std::path::Path;

/// A resolved user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

fn lookup(file: &Path, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name)
            .then(|| (f[2].parse().ok(), f[3].parse().ok()))
            .and_then(|(a, b)| Some((a?, b.unwrap_or(0))))
    })
}

/// Resolves `spec` against the image root `rootfs`; an empty spec is root.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<UserIds, String> {
    if spec.is_empty() {
        return Ok(UserIds { uid: 0, gid: 0 });
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, lookup_by_uid(&rootfs.join("etc/passwd"), uid).unwrap_or(0)),
        Err(_) => lookup(&rootfs.join("etc/passwd"), user).ok_or_else(|| {
            format!("user '{user}' is not in the image's /etc/passwd: use a numeric uid or create the user first")
        })?,
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&rootfs.join("etc/group"), g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("group '{g}' is not in the image's /etc/group: use a numeric gid"))?,
        },
    };
    Ok(UserIds { uid, gid })
}

fn lookup_by_uid(file: &Path, uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
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
            .contains("not in the image's /etc/passwd"));
    }
}
