//! `escape`: tries to get out of the sandbox and reports, as JSON in its reply, what
//! it found, so a test can assert that nothing leaked.
//!
//! The message text may contain a TCP port (the first number in it): the guest tries
//! to connect to `127.0.0.1:PORT` and to send a UDP datagram there. It also tries to
//! read `/etc/passwd` and `/proc/self/environ`, list `.`, `..` and `/`, create a file
//! in `.`, read the environment, the arguments, the current directory and stdin, and
//! resolve `localhost` and `example.com`. It prints a marker line to stdout and to
//! stderr (`escape guest: stdout marker` / `... stderr marker`) so a test can check
//! that the host turns them into log lines.
//!
//! Reply (one `say` in the same room):
//! `{"guest":"escape","port":N|null,"leaked":[PROBE...],"probes":[{"probe":NAME,"ok":BOOL,"leaked":BOOL,"detail":TEXT}...]}`
//! where `ok` means the operation itself succeeded and `leaked` that it found
//! something from outside the sandbox (file content, directory entries, a variable, an
//! argument, a connection, an address, input). A sandboxed run has `"leaked":[]`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};

use guest_support::{JsonObject, json_array, json_str, manifest, ping};
use roost_guest::{Action, Guest, Manifest, Message, say};

struct Escape;

struct Probe {
    name: String,
    ok: bool,
    leaked: bool,
    detail: String,
}

fn probe(name: &str, ok: bool, leaked: bool, detail: impl Into<String>) -> Probe {
    let mut detail = detail.into();
    if detail.len() > 2000 {
        let mut cut = 2000;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str("…(cut)");
    }
    Probe {
        name: name.into(),
        ok,
        leaked,
        detail,
    }
}

fn read_file(path: &str) -> Probe {
    let name = format!("read {path}");
    match std::fs::read(path) {
        Ok(bytes) => probe(
            &name,
            true,
            !bytes.is_empty(),
            String::from_utf8_lossy(&bytes),
        ),
        Err(e) => probe(&name, false, false, e.to_string()),
    }
}

fn list_dir(path: &str) -> Probe {
    let name = format!("list {path}");
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let names: Vec<String> = entries
                .map(|e| {
                    e.map_or_else(
                        |e| format!("<{e}>"),
                        |e| e.file_name().to_string_lossy().into_owned(),
                    )
                })
                .collect();
            probe(&name, true, !names.is_empty(), names.join(", "))
        }
        Err(e) => probe(&name, false, false, e.to_string()),
    }
}

fn create_file() -> Probe {
    let path = "./escape-was-here.txt";
    match std::fs::File::create(path).and_then(|mut f| f.write_all(b"escaped\n")) {
        Ok(()) => probe("create ./escape-was-here.txt", true, true, "wrote 8 bytes"),
        Err(e) => probe("create ./escape-was-here.txt", false, false, e.to_string()),
    }
}

fn env_probes() -> Vec<Probe> {
    let vars: Vec<String> = std::env::vars_os()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect();
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cwd = match std::env::current_dir() {
        Ok(dir) => {
            let dir = dir.to_string_lossy().into_owned();
            probe("current_dir", true, !(dir.is_empty() || dir == "/"), dir)
        }
        Err(e) => probe("current_dir", false, false, e.to_string()),
    };
    vec![
        probe("env vars", true, !vars.is_empty(), vars.join("\n")),
        probe("args", true, !args.is_empty(), args.join(" ")),
        cwd,
    ]
}

fn read_stdin() -> Probe {
    let mut buf = [0u8; 64];
    match std::io::stdin().read(&mut buf) {
        Ok(n) => probe(
            "read stdin",
            true,
            n > 0,
            String::from_utf8_lossy(&buf[..n]),
        ),
        Err(e) => probe("read stdin", false, false, e.to_string()),
    }
}

fn resolve(host: &str) -> Probe {
    let name = format!("resolve {host}");
    match (host, 80).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<String> = addrs.map(|a| a.to_string()).collect();
            probe(&name, true, !addrs.is_empty(), addrs.join(", "))
        }
        Err(e) => probe(&name, false, false, e.to_string()),
    }
}

fn network_probes(port: Option<u16>) -> Vec<Probe> {
    let port = port.unwrap_or(9);
    let target = format!("127.0.0.1:{port}");
    let tcp = match TcpStream::connect(target.as_str()) {
        Ok(mut stream) => {
            let _ = stream.write_all(b"escape guest was here\n");
            probe(&format!("tcp connect {target}"), true, true, "connected")
        }
        Err(e) => probe(
            &format!("tcp connect {target}"),
            false,
            false,
            e.to_string(),
        ),
    };
    let udp = match UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.send_to(b"escape guest was here\n", target.as_str()))
    {
        Ok(n) => probe(
            &format!("udp send {target}"),
            true,
            true,
            format!("sent {n} bytes"),
        ),
        Err(e) => probe(&format!("udp send {target}"), false, false, e.to_string()),
    };
    vec![tcp, udp, resolve("localhost"), resolve("example.com")]
}

/// The first number in `text` that fits a port.
fn port_in(text: &str) -> Option<u16> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
}

impl Guest for Escape {
    fn describe() -> Manifest {
        manifest(
            "escape",
            "Tries to leave the sandbox and reports what it found.",
        )
    }

    fn on_message(msg: Message) -> Vec<Action> {
        if let Some(pong) = ping(&msg, "escape") {
            return pong;
        }
        println!("escape guest: stdout marker");
        eprintln!("escape guest: stderr marker");
        let port = port_in(&msg.text);
        let mut probes = vec![
            read_file("/etc/passwd"),
            read_file("/proc/self/environ"),
            read_file("./Cargo.toml"),
            list_dir("."),
            list_dir(".."),
            list_dir("/"),
            create_file(),
        ];
        probes.extend(env_probes());
        probes.push(read_stdin());
        probes.extend(network_probes(port));

        let leaked: Vec<String> = probes
            .iter()
            .filter(|p| p.leaked)
            .map(|p| json_str(&p.name))
            .collect();
        let report = JsonObject::new()
            .str("guest", "escape")
            .raw(
                "port",
                port.map_or_else(|| "null".to_owned(), |p| p.to_string()),
            )
            .raw("leaked", json_array(leaked))
            .raw(
                "probes",
                json_array(probes.iter().map(|p| {
                    JsonObject::new()
                        .str("probe", &p.name)
                        .bool("ok", p.ok)
                        .bool("leaked", p.leaked)
                        .str("detail", &p.detail)
                        .finish()
                })),
            )
            .finish();
        vec![say(msg.room, report)]
    }
}

roost_guest::export!(Escape);

#[cfg(test)]
mod tests {
    use super::port_in;

    #[test]
    fn finds_the_port() {
        assert_eq!(port_in("connect to 12345 please"), Some(12345));
        assert_eq!(port_in("port=80"), Some(80));
        assert_eq!(port_in("no port"), None);
        assert_eq!(port_in("99999"), None);
    }
}
