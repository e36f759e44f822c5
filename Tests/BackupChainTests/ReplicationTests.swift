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

    // MARK: - Merges at the source (fold records)

    /// Five points of a 48M disk: a full layer of 40 MiB of data (ten chunks), then nights that
    /// change a little of the first 4 MiB, on three days (`--keep-daily 3` keeps 0, 3 and 4).
    static func nights(seed: UInt64) throws -> BackupScenario {
        let s = try BackupScenario(size: "48M", seed: seed)
        try Tools.qemuIO(s.disk, format: "qcow2", ["write -P 0x5a 0 40M"])
        try s.dirty(writes: 20, maxOffset: 40 << 20)
        try s.backup()
        for _ in 0..<4 {
            try s.dirty(writes: 3, maxOffset: 4 << 20)
            try s.backup()
        }
        try RepositoryTimes.setCreated(s.repo, [0: "2026-03-01T01:00:00Z", 1: "2026-03-02T01:00:00Z", 2: "2026-03-02T05:00:00Z",
                                                3: "2026-03-02T09:00:00Z", 4: "2026-03-03T01:00:00Z"])
        return s
    }

    /// `list --output json`'s layers (whole records: index, file, kind, sha256, chunks, …).
    static func listedLayers(_ dir: String) throws -> [[String: Any]] {
        let list = try QBackupBinary.run(["list", dir, "--output", "json"])
        return (try JSONHelpers.parse(list.stdout) as? [String: Any])?["layers"] as? [[String: Any]] ?? []
    }

    /// Issue 16 item D: after `merge` at the source (`--keep`: the oldest points fold into the
    /// full layer in place; a calendar rule: a fold in the middle of the chain, into an
    /// incremental layer), `replicate` brings the replica to exactly the source's points — the
    /// same records in `list --output json` (index, file, kind, sha256, chunks, bytes copied,
    /// created), byte-identical files and nothing else left, each point restoring its bytes,
    /// verify clean — sending only the chunks of the rewritten file that changed (counted on the
    /// wire, uncompressed). The old code refused: "it does not fit".
    @Test(arguments: ["keep", "calendar"]) func aMergeAtTheSourceReachesTheReplica(rule: String) throws {
        let s = try Self.nights(seed: rule == "keep" ? 80 : 81)
        let dst = s.dir.file("replica")
        let first = try QBackupBinary.run(["replicate", s.repo, dst, "--output", "json"])
        #expect(first.status == 0, "\(first.stderr)")
        let before = try Self.listedLayers(dst)
        #expect(before.count == 5)
        try s.qbackup(rule == "keep" ? ["merge", s.repo, "--keep", "2"] : ["merge", s.repo, "--keep-daily", "3"])
        var kept = rule == "keep" ? [3, 4] : [0, 3, 4]
        let source = try Self.listedLayers(s.repo)
        #expect(source.map { $0["index"] as? Int ?? -1 } == kept)
        let r = try QBackupBinary.run(["replicate", s.repo, dst, "--compress", "none", "--output", "json"])
        #expect(r.status == 0, "replicate after merge --\(rule): \(r.stderr)")
        #expect(Self.report(r)["layers-sent"] as? [Int] == [3], "\(r.stdout)")

        // The fold of point 3 went as the chunks that differ from the replica's closest file.
        let folded = source.first { $0["index"] as? Int == 3 } ?? [:]
        let chunks = folded["chunks"] as? [String] ?? []
        let differing = before.map { old in
            let theirs = old["chunks"] as? [String] ?? []
            return chunks.indices.filter { $0 >= theirs.count || theirs[$0] != chunks[$0] }.count
        }.min() ?? chunks.count
        let size = folded["file-size"] as? Int ?? 0
        let sent = Self.report(r)["stream-bytes"] as? Int ?? .max
        print("fold after merge --\(rule): \(sent) bytes sent for a \(size)-byte file, \(differing) of \(chunks.count) chunks differ")
        #expect(sent <= differing * (4 << 20) + 65536,
                "\(sent) bytes sent for a fold whose file differs from the replica's in \(differing) chunk(s)")
        if rule == "keep" {
            // A full layer of ten chunks, of which the nights changed a few.
            #expect(chunks.count >= 10 && differing <= chunks.count / 2, "\(differing) of \(chunks.count) chunks differ")
            #expect(sent < size / 2, "\(sent) bytes sent for a fold of a \(size)-byte file")
            // The next night continues the folded chain.
            try s.dirty(writes: 2, maxOffset: 4 << 20)
            try s.backup()
            kept.append(5)
            let night = try QBackupBinary.run(["replicate", s.repo, dst, "--output", "json"])
            #expect(night.status == 0 && Self.report(night)["layers-sent"] as? [Int] == [5], "\(night.stdout)\(night.stderr)")
        }

        let replica = try Self.listedLayers(dst)
        #expect(try replica.map { JSONHelpers.canonical($0) } == Self.listedLayers(s.repo).map { JSONHelpers.canonical($0) },
                "the replica's points differ from the source's after merge --\(rule)")
        #expect(replica.first { $0["index"] as? Int == 3 }?["kind"] as? String == (rule == "keep" ? "full" : "incremental"))
        #expect(try Self.layerFiles(dst) == Self.layerFiles(s.repo), "the replica's layer files differ from the source's")
        let names = { (dir: String) in Set(try FileManager.default.contentsOfDirectory(atPath: dir)) }
        #expect(try names(dst) == names(s.repo), "the replica holds other files than the source")
        try s.expectKeeps(kept, in: dst, step: "replica after merge --\(rule)")
    }

    static func report(_ r: Tools.Result) -> [String: Any] {
        ((try? JSONHelpers.parse(r.stdout)) as? [String: Any]) ?? [:]
    }
}
