//! Who a job runs as: pfcon's `CONTAINER_USER` (`uid:gid`, each part a number, a range
//! `lo-hi` picked at random per job, or empty).
//!
//! A user without a group runs with group 0, as `docker run --user UID` does (and as
//! OpenShift's arbitrary uids expect); a group without a user cannot be expressed to an
//! engine and is refused.

use std::fmt;

use crate::backend::UserId;

/// One part of the setting: a fixed id or a range to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Fixed(u32),
    Range(u32, u32),
}

impl Part {
    fn parse(text: &str) -> Result<Option<Self>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let number = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{s}` is not a number"))
        };
        match text.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (number(lo)?, number(hi)?);
                if lo > hi {
                    return Err(format!("range `{text}` is empty"));
                }
                Ok(Some(Part::Range(lo, hi)))
            }
            None => Ok(Some(Part::Fixed(number(text)?))),
        }
    }

    fn pick(self) -> u32 {
        match self {
            Part::Fixed(id) => id,
            Part::Range(lo, hi) => {
                let span = u64::from(hi - lo) + 1;
                // Uniform enough for spreading jobs over ids; not a secret.
                lo + (random_u64() % span) as u32
            }
        }
    }
}

fn random_u64() -> u64 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// The parsed setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContainerUser {
    uid: Option<Part>,
    gid: Option<Part>,
}

impl ContainerUser {
    /// Parses pfcon's syntax; empty or `:` means the image's own user.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = if value.trim().is_empty() { ":" } else { value };
        let Some((uid, gid)) = value.split_once(':') else {
            return Err(format!(
                "CONTAINER_USER `{value}` is not of the form UID:GID"
            ));
        };
        if gid.contains(':') {
            return Err(format!(
                "CONTAINER_USER `{value}` is not of the form UID:GID"
            ));
        }
        let user = Self {
            uid: Part::parse(uid).map_err(|e| format!("CONTAINER_USER uid: {e}"))?,
            gid: Part::parse(gid).map_err(|e| format!("CONTAINER_USER gid: {e}"))?,
        };
        if user.uid.is_none() && user.gid.is_some() {
            return Err(format!(
                "CONTAINER_USER `{value}` sets a group without a user; give UID:GID (engines cannot run as a group alone)"
            ));
        }
        Ok(user)
    }

    /// The ids for one job (drawn anew from ranges each time), or `None` for the image's.
    pub fn pick(&self) -> Option<UserId> {
        let uid = self.uid?.pick();
        Some(UserId {
            uid,
            gid: self.gid.map_or(0, Part::pick),
        })
    }
}

impl fmt::Display for ContainerUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |p: Option<Part>| match p {
            None => String::new(),
            Some(Part::Fixed(id)) => id.to_string(),
            Some(Part::Range(lo, hi)) => format!("{lo}-{hi}"),
        };
        write!(f, "{}:{}", part(self.uid), part(self.gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The cases of pfcon's test_container_user.py.
    #[test]
    fn parses_pfcon_forms() {
        for empty in ["", ":"] {
            assert_eq!(ContainerUser::parse(empty).unwrap().pick(), None);
        }
        assert_eq!(
            ContainerUser::parse("1000:").unwrap().pick(),
            Some(UserId { uid: 1000, gid: 0 })
        );
        for _ in 0..50 {
            let ids = ContainerUser::parse("1000-1234:").unwrap().pick().unwrap();
            assert!((1000..=1234).contains(&ids.uid));
            let ids = ContainerUser::parse("1000-1234:5678")
                .unwrap()
                .pick()
                .unwrap();
            assert!((1000..=1234).contains(&ids.uid) && ids.gid == 5678);
            let ids = ContainerUser::parse("1000-1234:5678-12345")
                .unwrap()
                .pick()
                .unwrap();
            assert!((5678..=12345).contains(&ids.gid));
        }
        assert_eq!(
            ContainerUser::parse("1000:1000").unwrap().pick(),
            Some(UserId {
                uid: 1000,
                gid: 1000
            })
        );
        assert!(ContainerUser::parse("abc:1").is_err());
        assert!(ContainerUser::parse("1000").is_err());
        assert!(ContainerUser::parse("5-1:").is_err());
        assert!(
            ContainerUser::parse(":1000")
                .unwrap_err()
                .contains("group without a user")
        );
    }
}
