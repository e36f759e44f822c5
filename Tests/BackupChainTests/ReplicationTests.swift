import Foundation
import Testing
import TestSupport

/// `qbackup send | qbackup receive` end to end (issue 16): a replica of a repository made by
/// real backups holds byte-identical layer files, restores every point byte-exact, verifies,
/// and refuses backup and merge; later nights send only their new layers.
@Suite struct ReplicationTests {
    /// A repository of 4 points: a zstd-compressed full layer, then plain incrementals.
    static func source(seed: UInt64) throws -> BackupScenario {
        let s = try BackupScenario(size: "48M", seed: seed)
        try s.dirty(writes: 40, zeroes: 4, maxOffset: 40 << 20)
        try s.backup(["--compress", "zstd"])
        for _ in 0..<3 {
            try s.dirty(writes: 6, zeroes: 2, discards: 1, maxOffset: 40 << 20)
            try s.backup()
        }
        return s
    }

    /// `qbackup send SRC ARGS > FILE`: the stream's bytes (what would go over the wire).
    static func send(_ s: BackupScenario, _ args: [String] = []) throws -> String {
        let file = s.dir.file("stream-\(UUID().uuidString.prefix(6))")
        let q = try QBackupBinary.path()
        let r = try Tools.run("/bin/bash", ["-c", "\"$0\" send \"$1\" \"${@:3}\" > \"$2\"", q, s.repo, file] + args)
        #expect(r.status == 0, "send \(args): \(r.stderr)")
        return file
    }

    /// `qbackup receive DST --output json < FILE`.
    static func receive(_ file: String, into dst: String) throws -> Tools.Result {
        try Tools.run("/bin/bash", ["-c", "\"$0\" receive \"$1\" --output json < \"$2\"", try QBackupBinary.path(), dst, file])
    }

    static func layerFiles(_ dir: String) throws -> [String: String] {
        try BackupScenario.digests(dir).filter { $0.key.hasSuffix(".qcow2") }
    }

    static func fileSize(_ path: String) throws -> UInt64 {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.uint64Value ?? 0
    }

    @Test func aReplicaHoldsTheSameFilesAndRestoresEveryPoint() throws {
        let s = try Self.source(seed: 16)
        let dst = s.dir.file("replica")
        // A real pipe, as over ssh.
        let q = try QBackupBinary.path()
        let piped = try Tools.run("/bin/bash", ["-c", "set -o pipefail; \"$0\" send \"$1\" | \"$0\" receive \"$2\" --output json",
                                                q, s.repo, dst])
        #expect(piped.status == 0, "\(piped.stderr)")
        let report = try JSONHelpers.parse(piped.stdout) as? [String: Any]
        #expect(report?["layers-received"] as? [Int] == [0, 1, 2, 3], "\(piped.stdout)")

        let source = try Self.layerFiles(s.repo)
        #expect(source.count == 4)
        #expect(try Self.layerFiles(dst) == source, "the replica's layer files differ from the source's")
        let listing = try JSONHelpers.parse(try s.qbackup(["list", dst, "--output", "json"]).stdout) as? [String: Any]
        let origin = try JSONHelpers.parse(try s.qbackup(["list", s.repo, "--output", "json"]).stdout) as? [String: Any]
        #expect(listing?["replica-of"] as? String == origin?["id"] as? String)
        #expect(listing?["id"] as? String != origin?["id"] as? String)
        let points = { (j: [String: Any]?) in (j?["layers"] as? [[String: Any]] ?? []).map { "\($0["index"] ?? "")/\($0["sha256"] ?? "")" } }
        #expect(points(listing) == points(origin))
        try s.expectKeeps([0, 1, 2, 3], in: dst, step: "replica")
        for name in source.keys { try s.expectQemuCheckClean("\(dst)/\(name)") }

        // A replica follows its source: backup and merge refuse it, and change nothing.
        let before = try BackupScenario.digests(dst)
        for args in [["backup", s.disk, "--repo", dst], ["merge", dst, "--keep", "1"]] {
            let r = try QBackupBinary.run(args)
            #expect(r.failedCleanly && r.stderr.contains("is a replica of"), "\(args): \(r.stderr)")
        }
        #expect(try BackupScenario.digests(dst) == before)
    }

    /// Later nights send only their layers (counted on the wire); --have and --after agree, and
    /// a replica that is up to date gets an empty stream.
    @Test func laterNightsSendOnlyTheirLayers() throws {
        let s = try Self.source(seed: 17)
        let dst = s.dir.file("replica")
        let first = try Self.send(s)
        #expect(try Self.receive(first, into: dst).status == 0)
        let firstBytes = try Self.fileSize(first)
        for night in 0..<2 {
            try s.dirty(writes: 3, maxOffset: 40 << 20)
            let layer = try s.backup()
            let index = layer["index"] as? Int ?? -1
            let have = s.dir.file("have-\(night).json")
            try s.qbackup(["list", dst, "--output", "json"]).stdout.write(toFile: have, atomically: true, encoding: .utf8)
            let stream = try Self.send(s, ["--have", have])
            let viaAfter = try Self.send(s, ["--after", String(index - 1)])
            #expect(try Data.contents(of: stream) == Data.contents(of: viaAfter), "--have and --after send different streams")
            let r = try Self.receive(stream, into: dst)
            #expect(r.status == 0, "night \(night): \(r.stderr)")
            let report = try JSONHelpers.parse(r.stdout) as? [String: Any]
            #expect(report?["layers-received"] as? [Int] == [index], "\(r.stdout)")
            let newFile = try s.layers().last?["file"] as? String ?? ""
            let layerSize = try Self.fileSize("\(s.repo)/\(newFile)")
            #expect(report?["file-bytes"] as? Int == Int(layerSize))
            // Only the new layer goes: its bytes at most (lz4, holes left out) plus framing.
            let wire = try Self.fileSize(stream)
            #expect(wire <= layerSize + 4096, "night \(night): \(wire) bytes on the wire for a layer of \(layerSize)")
            #expect(wire < firstBytes, "night \(night): \(wire) bytes, the first copy was \(firstBytes)")
            #expect(report?["stream-bytes"] as? Int == Int(wire))
        }
        #expect(try Self.layerFiles(dst) == Self.layerFiles(s.repo))
        try s.expectKeeps([0, 1, 2, 3, 4, 5], in: dst, step: "after two nights")
        // Up to date: nothing to send, nothing changes.
        let have = s.dir.file("have-final.json")
        try s.qbackup(["list", dst, "--output", "json"]).stdout.write(toFile: have, atomically: true, encoding: .utf8)
        let empty = try Self.send(s, ["--have", have])
        #expect(try Self.fileSize(empty) < 1024)
        let before = try BackupScenario.digests(dst)
        let r = try Self.receive(empty, into: dst)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try BackupScenario.digests(dst) == before)
    }

    /// --compress none carries the same files (bytes as they are, holes still left out).
    @Test func uncompressedStreamsCarryTheSameFiles() throws {
        let s = try Self.source(seed: 18)
        let plain = try Self.send(s, ["--compress", "none"])
        let lz4 = try Self.send(s)
        #expect(try Self.fileSize(lz4) < Self.fileSize(plain))
        let dst = s.dir.file("replica")
        let r = try Self.receive(plain, into: dst)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try Self.layerFiles(dst) == Self.layerFiles(s.repo))
        try s.qbackup(["verify", dst])
    }
}
