//! Names and addresses shared by the coordinator and the replicas: budget names, member
//! names and plain-HTTP URLs (the coordinator's and an HTTP sink's).

/// Longest budget namespace or name, and longest member name: a Kubernetes object name.
pub const NAME_MAX_LEN: usize = 253;

/// One half of a budget's `namespace/name`: 1 to 253 of `a-z 0-9 - .`, as Kubernetes names
/// the ThrottledConsumer it stands for. The budgets file always had this rule; `pacer run
/// --budget` accepted any text, so a typo was found only by a 404 at the first lease.
pub fn budget_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {NAME_MAX_LEN} characters of a-z, 0-9, '-' or '.', got {name:?}"
        ))
    }
}

/// A member name (a replica's pod name): 1 to 253 of `A-Z a-z 0-9 . - _`.
pub fn member_name(member: &str) -> Result<(), String> {
    if member.is_empty() || member.len() > NAME_MAX_LEN {
        return Err(format!(
            "must be 1 to {NAME_MAX_LEN} characters, got {}",
            member.len()
        ));
    }
    match member
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(format!(
            "only letters, digits, '.', '-' and '_' are accepted, got {c:?}"
        )),
        None => Ok(()),
    }
}

/// The syntax of [`http_url`] that a regular expression can check, for the CRD schema.
pub const HTTP_URL_PATTERN: &str = r"^http://[^\s/][^\s]*$";

/// A plain-HTTP URL with a host: `http://HOST[:PORT][/PATH]`, no whitespace, a port (if
/// any) from 0 to 65535. Replicas speak plain HTTP to the coordinator and to an HTTP sink
/// (TLS ends in a sidecar). The operator used to refuse commas in a sink URL, which the
/// runtime accepted; commas are legal in URLs (`?fields=a,b`) and nothing splits this
/// value, so the runtime's rule won. The runtime used to refuse a bad port only when
/// parsing the URL; the port is now part of the rule.
pub fn http_url(url: &str) -> Result<(), String> {
    let refuse = || Err(format!("{url:?} is not an http://HOST[:PORT][/PATH] URL"));
    let Some(rest) = url.strip_prefix("http://") else {
        return refuse();
    };
    if url.chars().any(char::is_whitespace) {
        return refuse();
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials (`user:password@`) may hold a colon that is not the port's.
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    match split_port(host_port) {
        Some((host, port)) if !host.is_empty() && port.is_none_or(|p| p.parse::<u16>().is_ok()) => {
            Ok(())
        }
        _ => refuse(),
    }
}

/// `host` and the port after it, if any; `None` when an IPv6 literal is not closed.
fn split_port(host_port: &str) -> Option<(&str, Option<&str>)> {
    let after_host = if host_port.starts_with('[') {
        host_port.find(']')? + 1
    } else {
        host_port.find(':').unwrap_or(host_port.len())
    };
    let (host, rest) = host_port.split_at(after_host);
    match rest.strip_prefix(':') {
        Some(port) => Some((host, Some(port))),
        None if rest.is_empty() => Some((host, None)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_names_are_kubernetes_names() {
        assert!(budget_name("orders-sync.v2").is_ok());
        assert!(budget_name(&"a".repeat(NAME_MAX_LEN)).is_ok());
        for bad in ["", "Orders", "a_b", "a/b", &"a".repeat(NAME_MAX_LEN + 1)] {
            assert!(budget_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            budget_name("Orders").unwrap_err(),
            r#"must be 1 to 253 characters of a-z, 0-9, '-' or '.', got "Orders""#
        );
    }

    #[test]
    fn member_names_are_pod_names_and_then_some() {
        assert!(member_name("orders-7d9f-x2").is_ok());
        assert!(member_name("Replica_0.a").is_ok());
        assert_eq!(
            member_name("").unwrap_err(),
            "must be 1 to 253 characters, got 0"
        );
        assert_eq!(
            member_name("a b").unwrap_err(),
            "only letters, digits, '.', '-' and '_' are accepted, got ' '"
        );
    }

    #[test]
    fn http_urls_need_a_host_and_a_valid_port() {
        for ok in [
            "http://h",
            "http://127.0.0.1:8080/handle",
            "http://h:65535",
            "http://h/a,b?x=1,2",
            "http://user:pw@h:80/x",
            "http://[::1]:9/",
            "http://h?q",
        ] {
            assert_eq!(http_url(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "http://",
            "http:///x",
            "https://h/",
            "ftp://h/",
            "http://h x/",
            "http://h:65536/",
            "http://h:port/",
            "http://h:/",
            "http://[::1/",
            "http://:80/",
        ] {
            assert!(http_url(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            http_url("https://h/").unwrap_err(),
            r#""https://h/" is not an http://HOST[:PORT][/PATH] URL"#
        );
    }
}
