import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A read-only `qemu-nbd` export of one image on a unix socket in a temp dir,
/// for reading QEMU's view of a dirty bitmap with `nbdinfo`. Stopped by pid.
public final class QemuNBD {
    /// One extent of `nbdinfo --map`, adjacent extents of the same state merged.
    public struct Extent: Equatable, Sendable, CustomStringConvertible {
        public var start: UInt64
        public var length: UInt64
        public var dirty: Bool
        public init(start: UInt64, length: UInt64, dirty: Bool) {
            self.start = start
            self.length = length
            self.dirty = dirty
        }
        public var description: String { "\(start)+\(length) \(dirty ? "dirty" : "clean")" }
    }

    /// The unix socket (a path in the temp dir; no file when the server listens on TCP).
    public let socket: String
    /// The port on 127.0.0.1 of a server started with `tcp` (the kernel picks it), else nil.
    public let port: Int?
    private let pid: pid_t

    /// Starts `qemu-nbd -r -t -B BITMAP -k SOCKET -f qcow2 IMAGE` as a daemon
    /// (`--fork`: it returns once the export is ready) and reads its pid. With
    /// `readOnly` false the export is writable, so QEMU holds the image's write lock. `shared`
    /// is qemu-nbd's `-e`: how many clients at once (a read-only export with more than one
    /// advertises multi-conn). With `tls` (a folder of `TLSCertificates.make`) the server
    /// takes TLS clients only (x509); with `verifyPeer` also only those showing a client
    /// certificate signed by that folder's CA. With `tcp` it listens on 127.0.0.1 at a port
    /// the kernel picks (`port`) instead of the unix socket.
    public init(image: String, bitmap: String?, directory: TempDir, readOnly: Bool = true, shared: Int = 1,
                tls: String? = nil, verifyPeer: Bool = false, tcp: Bool = false) throws {
        let tag = UUID().uuidString.prefix(6)
        socket = directory.file("nbd-\(tag).sock")
        let pidFile = directory.file("nbd-\(tag).pid")
        // The daemon outlives this call, so it must not keep the write end of another
        // test's pipe open (that test would wait for EOF forever): bash closes every
        // inherited descriptor above stderr before exec'ing qemu-nbd.
        let closeInherited = "for fd in $(ls /proc/$$/fd); do if [ \"$fd\" -gt 2 ]; then eval \"exec $fd>&-\" 2>/dev/null; fi; done; exec \"$@\""
        var args = ["-c", closeInherited, "qemu-nbd", try Tools.which("qemu-nbd"), "--fork", "--pid-file=\(pidFile)", "-t"]
        if readOnly { args.append("-r") }
        if shared != 1 { args += ["-e", String(shared)] }
        if let tls {
            args += ["--object", "tls-creds-x509,id=tls0,dir=\(tls),endpoint=server,verify-peer=\(verifyPeer ? "on" : "off")",
                     "--tls-creds", "tls0"]
        }
        if let bitmap { args += ["-B", bitmap] }
        args += tcp ? ["-b", "127.0.0.1", "-p", "0"] : ["-k", socket]
        try Tools.qemu("bash", args + ["-f", "qcow2", image])
        let text = (try? String(contentsOfFile: pidFile, encoding: .utf8)) ?? ""
        let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        let port = pid > 0 && tcp ? Self.listeningPort(of: pid) : nil
        guard pid > 0, tcp ? port != nil : FileManager.default.fileExists(atPath: socket) else {
            if pid > 0 { kill(pid, SIGKILL) }
            throw Tools.ToolFailure(command: "qemu-nbd --fork (no pid file, socket or listening port)",
                                    result: Tools.Result(status: -1, stdout: "", stderr: text, stdoutData: Data()))
        }
        self.pid = pid
        self.port = port
    }

    /// The port of the TCP socket `pid` listens on: the inode of one of its socket
    /// descriptors in a LISTEN (0A) row of /proc/net/tcp, whose local address ends in the port (hex).
    static func listeningPort(of pid: pid_t) -> Int? {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        let inodes = Set(fds.compactMap { fd -> String? in
            let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) ?? ""
            guard link.hasPrefix("socket:[") else { return nil }
            return String(link.dropFirst("socket:[".count).dropLast())
        })
        let table = (try? String(contentsOfFile: "/proc/net/tcp", encoding: .utf8)) ?? ""
        for row in table.split(separator: "\n").dropFirst() {
            let fields = row.split(separator: " ")
            guard fields.count > 9, fields[3] == "0A", inodes.contains(String(fields[9])),
                  let hex = fields[1].split(separator: ":").last, let port = Int(hex, radix: 16)
            else { continue }
            return port
        }
        return nil
    }

    deinit { stop() }

    /// How many sockets the server has open: its listening socket plus one per client.
    public var openSockets: Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return fds.filter {
            ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) ?? "").hasPrefix("socket:")
        }.count
    }

    /// Stops the server by its pid and waits (up to 10 s) until it is gone.
    /// SIGKILL, not SIGTERM: the daemon inherits the test thread's signal mask, in
    /// which SIGTERM may be blocked; the export is read-only, so nothing is lost.
    public func stop() {
        guard Self.isAlive(pid) else { return }
        kill(pid, SIGKILL)
        let deadline = Date().addingTimeInterval(10)
        while Self.isAlive(pid) && Date() < deadline { usleep(1_000) }
    }

    /// Whether `pid` runs (a zombie, which nobody may reap in a container, counts as gone).
    static func isAlive(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")")
        else { return false }
        let state = stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).prefix(1)
        return state != "Z" && state != "X"
    }

    /// `nbdinfo --json --map=qemu:dirty-bitmap:NAME` against this export, merged.
    public func dirtyMap(bitmap: String) throws -> [Extent] {
        let result = try Tools.qemu("nbdinfo", ["--json", "--map=qemu:dirty-bitmap:\(bitmap)", "nbd+unix:///?socket=\(socket)"])
        guard let items = try JSONSerialization.jsonObject(with: result.stdoutData) as? [[String: Any]] else {
            throw Tools.ToolFailure(command: "nbdinfo (unexpected JSON)", result: result)
        }
        var extents: [Extent] = []
        for item in items {
            guard let offset = (item["offset"] as? NSNumber)?.uint64Value, let length = (item["length"] as? NSNumber)?.uint64Value,
                  let type = (item["type"] as? NSNumber)?.intValue
            else { throw Tools.ToolFailure(command: "nbdinfo (extent without offset/length/type)", result: result) }
            let dirty = type & 1 != 0
            if let last = extents.last, last.dirty == dirty, last.start + last.length == offset {
                extents[extents.count - 1].length += length
            } else {
                extents.append(Extent(start: offset, length: length, dirty: dirty))
            }
        }
        return extents
    }

    /// QEMU's view of `bitmap` in `image`: starts an export, maps it, stops it.
    public static func dirtyMap(image: String, bitmap: String, directory: TempDir) throws -> [Extent] {
        let server = try QemuNBD(image: image, bitmap: bitmap, directory: directory)
        defer { server.stop() }
        return try server.dirtyMap(bitmap: bitmap)
    }
}


/// Waits (up to 5 s) until no open file holds QEMU's lock bytes of `path`: the kernel drops
/// a killed daemon's locks a moment after it is gone. Only for a caller that does not hold
/// the image open itself (a CLI test about to run the binary on it).
public func waitForImageLocksToClear(_ path: String) {
    let deadline = Date().addingTimeInterval(5)
    while imageLocked(path) && Date() < deadline { usleep(2_000) }
}

/// Whether another open file holds any of QEMU's lock bytes (100-107, 200-207) of `path`.
public func imageLocked(_ path: String) -> Bool {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    for base in [100, 200] {
        var fl = flock()
        fl.l_type = Int16(F_WRLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(base)
        fl.l_len = 8
        fl.l_pid = 0
        if fcntl(fd, 36 /* F_OFD_GETLK */, &fl) == 0 && fl.l_type != Int16(F_UNLCK) { return true }
    }
    return false
}

/// A throw-away certificate authority, a server certificate for `server` (localhost and
/// 127.0.0.1 by default) and, with `client`, a client certificate, made with GnuTLS's
/// certtool in folder `name` of `directory`, in the file names QEMU's tls-creds-x509 and
/// libnbd's tls-certificates=DIR read (ca-cert.pem, server-cert.pem, server-key.pem,
/// client-cert.pem, client-key.pem). Each call makes its own CA. ECDSA keys: certtool makes
/// one in milliseconds, an RSA key takes it about a second.
public enum TLSCertificates {
    public static func make(in directory: TempDir, name: String = "tls", server: String = "localhost",
                            client: Bool = false) throws -> String {
        let dir = directory.file(name)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let certtool = try Tools.which("certtool", hint: "gnutls-bin")
        func file(_ name: String) -> String { "\(dir)/\(name)" }
        let serverNames = server == "localhost" ? "dns_name = localhost\nip_address = 127.0.0.1\n" : "dns_name = \(server)\n"
        try "cn = qbackup test CA\nca\ncert_signing_key\nexpiration_days = 2\n"
            .write(toFile: file("ca.info"), atomically: true, encoding: .utf8)
        try "cn = \(server)\n\(serverNames)tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n"
            .write(toFile: file("server.info"), atomically: true, encoding: .utf8)
        try "cn = qbackup test client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n"
            .write(toFile: file("client.info"), atomically: true, encoding: .utf8)
        func signed(_ role: String) -> [[String]] {
            [["--generate-privkey", "--key-type", "ecdsa", "--outfile", file("\(role)-key.pem")],
             ["--generate-certificate", "--load-ca-certificate", file("ca-cert.pem"), "--load-ca-privkey", file("ca-key.pem"),
              "--load-privkey", file("\(role)-key.pem"), "--template", file("\(role).info"),
              "--outfile", file("\(role)-cert.pem")]]
        }
        let steps: [[String]] = [
            ["--generate-privkey", "--key-type", "ecdsa", "--outfile", file("ca-key.pem")],
            ["--generate-self-signed", "--load-privkey", file("ca-key.pem"), "--template", file("ca.info"),
             "--outfile", file("ca-cert.pem")],
        ] + signed("server") + (client ? signed("client") : [])
        for step in steps {
            let result = try Tools.run(certtool, step)
            guard result.status == 0 else { throw Tools.ToolFailure(command: "certtool \(step.joined(separator: " "))", result: result) }
        }
        return dir
    }

    /// A client's tls-certificates folder `name` made of files of other folders
    /// (for instance one CA's ca-cert.pem with another CA's client certificate).
    public static func folder(in directory: TempDir, name: String, files: [(from: String, file: String)]) throws -> String {
        let dir = directory.file(name)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for (from, file) in files { try FileManager.default.copyItem(atPath: "\(from)/\(file)", toPath: "\(dir)/\(file)") }
        return dir
    }
}
