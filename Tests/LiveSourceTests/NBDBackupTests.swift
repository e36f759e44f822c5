import Foundation
import Testing
import TestSupport

/// `qbackup backup --nbd URI` (the real binary) against `qemu-nbd -r -B NAME`: a full and
/// incremental chain where every point restores byte-exact (qemu-img compare), the
/// exporter's bitmap left as it was, and refusals that change nothing.
@Suite struct NBDBackupTests {
    static func uri(_ server: QemuNBD) -> String { "nbd+unix:///?socket=\(server.socket)" }

    static func json(_ result: Tools.Result) throws -> [String: Any] {
        #expect(result.status == 0, "qbackup failed: \(result.stderr)")
        return try JSONHelpers.parse(result.stdout) as? [String: Any] ?? [:]
    }

    /// Backs up `disk` through a fresh read-only export of it.
    static func backupThroughExport(_ disk: String, dir: TempDir, repo: String, bitmap: String?,
                                    extra: [String] = []) throws -> Tools.Result {
        let server = try QemuNBD(image: disk, bitmap: bitmap, directory: dir)
        defer { server.stop() }
        var args = ["backup", "--nbd", uri(server), "--repo", repo, "--output", "json"] + extra
        if let bitmap { args += ["--bitmap", bitmap] }
        return try QBackupBinary.run(args)
    }

    /// A refusal that changed nothing: exit status 1, one `qbackup: error:` line and no crash
    /// (TestSupport's `failedCleanly`) and nothing else on stderr (no libnbd/gnutls chatter),
    /// and the manifest of `repo` as it was (`before`: its bytes, nil where there was none).
    static func expectRefused(_ result: Tools.Result, repo: String, manifestBefore before: Data? = nil,
                              _ why: String = "", sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(result.status == 1 && result.failedCleanly && result.stderr.split(separator: "\n").count == 1,
                "\(why): exit \(result.status): \(result.stderr)", sourceLocation: sourceLocation)
        #expect((try? Data.contents(of: repo + "/manifest.json")) == before, "\(why): the manifest changed",
                sourceLocation: sourceLocation)
    }

    /// Each point `i` of `repo` restores to raw byte-exact as the raw image `points[i]` (qemu-img compare).
    static func expectPointsRestore(_ repo: String, _ points: [String], dir: TempDir,
                                    sourceLocation: SourceLocation = #_sourceLocation) throws {
        for (i, point) in points.enumerated() {
            let out = dir.file("restored\(i).raw")
            let restored = try QBackupBinary.run(["restore", repo, "--to", out, "--at", "\(i)", "--format", "raw"])
            #expect(restored.status == 0, "\(restored.stderr)", sourceLocation: sourceLocation)
            let compare = try Tools.run(try Tools.which("qemu-img"), ["compare", "-f", "raw", "-F", "raw", out, point])
            #expect(compare.status == 0, "point \(i): \(compare.stdout)\(compare.stderr)", sourceLocation: sourceLocation)
        }
    }

    @Test func fullAndIncrementalRestoreByteExact() throws {
        let dir = TempDir("nbd-backup")
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "16M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x11 0 2M", "write -P 0x12 9M 1M"])
        try Tools.qemuImg("bitmap", "--add", disk, "b0")
        var points: [String] = []
        func snapshot() throws {
            let copy = dir.file("point\(points.count).raw")
            try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, copy)
            points.append(copy)
        }

        try snapshot()
        let first = try Self.json(try Self.backupThroughExport(disk, dir: dir, repo: repo, bitmap: "b0",
                                                               extra: ["--source-name", "vm1-vda"]))
        #expect(first["kind"] as? String == "full")
        #expect(first["bitmap-reset"] as? Bool == false)

        // Guest writes after the full backup, tracked by b0 (qemu-io marks enabled bitmaps dirty).
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x21 1M 64k", "write -P 0x22 12M 1M", "write -z 9M 64k"])
        try snapshot()
        let second = try Self.json(try Self.backupThroughExport(disk, dir: dir, repo: repo, bitmap: "b0",
                                                                extra: ["--source-name", "vm1-vda"]))
        #expect(second["kind"] as? String == "incremental")
        // The exporter's bitmap was not reset, so the next layer copies the union (the exporter's business).
        let dirtyNow = try QemuNBD.dirtyMap(image: disk, bitmap: "b0", directory: dir).filter(\.dirty)
        #expect(dirtyNow.reduce(0) { $0 + $1.length } == 64 << 10 + 1 << 20 + 64 << 10)
        #expect(second["bytes-copied"] as? Int == 64 << 10 + 1 << 20)  // the zeroed 64k is a zero cluster, not data

        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x31 15M 512k"])
        try snapshot()
        let third = try Self.json(try Self.backupThroughExport(disk, dir: dir, repo: repo, bitmap: "b0",
                                                               extra: ["--source-name", "vm1-vda"]))
        #expect(third["kind"] as? String == "incremental")

        let list = try JSONHelpers.parse(try QBackupBinary.run(["list", repo, "--output", "json"]).stdout) as? [String: Any]
        #expect(list?["source"] as? String == "vm1-vda" || (list?["source"] as? [String: Any]) != nil)
        try Self.expectPointsRestore(repo, points, dir: dir)
        let verify = try QBackupBinary.run(["verify", repo])
        #expect(verify.status == 0, "\(verify.stderr)")
    }

    /// Without --bitmap every layer is full; the manifest names the URI.
    @Test func withoutBitmapEveryLayerIsFull() throws {
        let dir = TempDir("nbd-backup-full")
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "4M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x41 0 1M"])
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir)
        defer { server.stop() }
        for _ in 0..<2 {
            let result = try Self.json(try QBackupBinary.run(["backup", "--nbd", Self.uri(server), "--repo", repo, "--output", "json"]))
            #expect(result["kind"] as? String == "full")
            #expect(result["mode"] as? String == "nbd")
            #expect(result["bytes-copied"] as? Int == 1 << 20)
        }
        #expect(try layerModes(repo) == ["nbd", "nbd"])
        let manifest = try String(contentsOfFile: dir.file("repo/manifest.json"), encoding: .utf8)
        #expect(manifest.contains(server.socket))
        let incremental = try QBackupBinary.run(["backup", "--nbd", Self.uri(server), "--repo", repo, "--incremental"])
        #expect(incremental.status != 0)
        #expect(incremental.stderr.hasPrefix("qbackup: error:"))
    }

    /// --bitmap NAME on an export without that context: one clear error, nothing created or changed.
    @Test func refusesAMissingBitmapContext() throws {
        let dir = TempDir("nbd-backup-refuse")
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "4M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x51 0 64k"])
        let full = try Self.backupThroughExport(disk, dir: dir, repo: repo, bitmap: nil, extra: ["--source-name", "d"])
        #expect(full.status == 0, "\(full.stderr)")
        let before = try Data.contents(of: dir.file("repo/manifest.json"))
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir)
        defer { server.stop() }
        let refused = try QBackupBinary.run(["backup", "--nbd", Self.uri(server), "--repo", repo, "--bitmap", "b0",
                                             "--source-name", "d"])
        Self.expectRefused(refused, repo: repo, manifestBefore: before)
        #expect(refused.stderr.contains("qemu:dirty-bitmap:b0"), "\(refused.stderr)")
    }

    /// nbds:// (TLS): a full and an incremental backup through a qemu-nbd that takes TLS
    /// clients only (its own CA, named with tls-certificates=DIR) restore byte-exact; the same
    /// server refuses a plain nbd:// client and an nbds:// client refuses a server without TLS,
    /// each with one clear error and nothing recorded.
    @Test func tlsExportsThroughNBDS() throws {
        let dir = TempDir("nbd-backup-tls")
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        let certificates = try TLSCertificates.make(in: dir)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "8M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x61 0 1M", "write -P 0x62 5M 512k"])
        try Tools.qemuImg("bitmap", "--add", disk, "b0")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x63 2M 64k"])
        func tlsURI(_ server: QemuNBD) -> String {
            "nbds+unix:///?socket=\(server.socket)&tls-certificates=\(certificates)"
        }
        do {
            let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir, tls: certificates)
            defer { server.stop() }
            Self.expectRefused(try QBackupBinary.run(["backup", "--nbd", Self.uri(server), "--repo", repo, "--bitmap", "b0"]),
                               repo: repo, "nbd:// to a TLS-only server")
        }
        do {
            let plain = try QemuNBD(image: disk, bitmap: "b0", directory: dir)
            defer { plain.stop() }
            Self.expectRefused(try QBackupBinary.run(["backup", "--nbd", tlsURI(plain), "--repo", repo, "--bitmap", "b0"]),
                               repo: repo, "nbds:// to a server without TLS")
        }

        var points: [String] = []
        for round in 0..<2 {
            if round == 1 { try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x64 6M 1M"]) }
            let point = dir.file("point\(round).raw")
            try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, point)
            points.append(point)
            let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir, tls: certificates)
            defer { server.stop() }
            let result = try Self.json(try QBackupBinary.run(["backup", "--nbd", tlsURI(server), "--repo", repo,
                                                              "--bitmap", "b0", "--source-name", "tls-disk",
                                                              "--output", "json"]))
            #expect(result["kind"] as? String == (round == 0 ? "full" : "incremental"))
        }
        try Self.expectPointsRestore(repo, points, dir: dir)
    }

    /// nbds://127.0.0.1:PORT/ (TLS over TCP) to a qemu-nbd that asks for a client certificate
    /// (verify-peer=on) and allows multi-conn: a client showing one signed by the server's CA
    /// (tls-certificates=DIR with client-cert.pem/client-key.pem) makes a full and an
    /// incremental layer, by IP and by host name, that restore byte-exact. Refused, each with
    /// one clear error and nothing recorded: no client certificate, a client certificate of
    /// another CA, a server whose certificate names another host, and plain nbd://.
    @Test func tlsOverTCPWithClientCertificates() throws {
        let dir = TempDir("nbd-backup-tls-tcp")
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        let good = try TLSCertificates.make(in: dir, client: true)
        let rogue = try TLSCertificates.make(in: dir, name: "rogue", client: true)
        let noClient = try TLSCertificates.folder(in: dir, name: "no-client", files: [(good, "ca-cert.pem")])
        let otherCA = try TLSCertificates.folder(in: dir, name: "other-ca", files: [
            (good, "ca-cert.pem"), (rogue, "client-cert.pem"), (rogue, "client-key.pem")])
        let elsewhere = try TLSCertificates.make(in: dir, name: "elsewhere", server: "backup.invalid", client: true)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "8M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x71 0 1M", "write -P 0x72 5M 512k"])
        try Tools.qemuImg("bitmap", "--add", disk, "b0")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x73 2M 64k"])
        func tcpURI(_ server: QemuNBD, host: String = "127.0.0.1", tls certificates: String?) -> String {
            guard let certificates else { return "nbd://\(host):\(server.port ?? 0)/" }
            return "nbds://\(host):\(server.port ?? 0)/?tls-certificates=\(certificates)"
        }
        func backup(_ uri: String) throws -> Tools.Result {
            try QBackupBinary.run(["backup", "--nbd", uri, "--repo", repo, "--bitmap", "b0", "--source-name", "tcp-disk",
                                   "--output", "json"])
        }
        do {
            let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir, shared: 2, tls: good, verifyPeer: true, tcp: true)
            defer { server.stop() }
            Self.expectRefused(try backup(tcpURI(server, tls: noClient)), repo: repo, "no client certificate")
            Self.expectRefused(try backup(tcpURI(server, tls: otherCA)), repo: repo, "a client certificate of another CA")
            Self.expectRefused(try backup(tcpURI(server, tls: nil)), repo: repo, "plain nbd://")
        }
        do {
            let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir, tls: elsewhere, verifyPeer: true, tcp: true)
            defer { server.stop() }
            Self.expectRefused(try backup(tcpURI(server, tls: elsewhere)), repo: repo, "a server certificate for another host")
        }

        var points: [String] = []
        for (round, host) in ["127.0.0.1", "localhost"].enumerated() {
            if round == 1 { try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x74 6M 1M"]) }
            let point = dir.file("point\(round).raw")
            try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, point)
            points.append(point)
            let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir, shared: 2, tls: good, verifyPeer: true, tcp: true)
            defer { server.stop() }
            let result = try Self.json(try backup(tcpURI(server, host: host, tls: good)))
            #expect(result["kind"] as? String == (round == 0 ? "full" : "incremental"))
            #expect(result["bytes-copied"] as? Int == (round == 0 ? 1 << 20 + 512 << 10 + 64 << 10 : 64 << 10 + 1 << 20))
        }
        try Self.expectPointsRestore(repo, points, dir: dir)
    }
}
