import Foundation
import Testing
import TestSupport

/// A disk, a repository and references: drives `qbackup` end to end with QEMU
/// as the writer, and keeps a raw reference of the disk at every backup.
final class BackupScenario {
    let dir = TempDir("qbackup-e2e")
    let disk: String
    let repo: String
    var references: [String] = []
    var random: SeededRandom

    init(size: String = "2G", createOptions: String = "cluster_size=65536", seed: UInt64 = 1, repoName: String = "repo")
        throws
    {
        disk = dir.file("disk.qcow2")
        repo = dir.file(repoName)
        random = SeededRandom(seed: seed)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", createOptions, disk, size)
    }

    /// A repository of `count` points of a disk of `size`: `fullWrites` seeded qemu-io writes
    /// below `maxOffset` before the full backup, `writes` before each incremental.
    static func points(_ count: Int, size: String, seed: UInt64, fullWrites: Int, writes: Int, maxOffset: UInt64)
        throws -> BackupScenario
    {
        let s = try BackupScenario(size: size, seed: seed)
        for k in 0..<count {
            try s.dirty(writes: k == 0 ? fullWrites : writes, maxOffset: maxOffset)
            try s.backup()
        }
        return s
    }

    /// SHA-256 of every file in `dir` (hidden ones included), by name.
    static func digests(_ dir: String) throws -> [String: String] {
        var out: [String: String] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: dir) {
            out[name] = String(try Tools.run("sha256sum", ["\(dir)/\(name)"]).stdout.prefix(64))
        }
        return out
    }

    /// `qbackup ARGS`, expecting success; returns stdout.
    @discardableResult
    func qbackup(_ args: [String], expect status: Int32 = 0, sourceLocation: SourceLocation = #_sourceLocation) throws
        -> Tools.Result
    {
        let result = try QBackupBinary.run(args)
        #expect(result.status == status, "qbackup \(args.joined(separator: " ")): \(result.stderr)",
                sourceLocation: sourceLocation)
        return result
    }

    /// Random writes of seeded data at unaligned offsets, zero writes and discards, via qemu-io.
    func dirty(writes: Int, zeroes: Int = 0, discards: Int = 0, maxOffset: UInt64? = nil) throws {
        let limit = try maxOffset ?? (virtualSize() - (1 << 20))
        var commands: [String] = []
        for _ in 0..<writes {
            let offset = random.next() % limit
            let length = 1 + random.next() % (200 << 10)
            commands.append("write -P \(random.next() % 255 + 1) \(offset) \(length)")
        }
        for _ in 0..<zeroes {
            let offset = (random.next() % limit) & ~UInt64(511)
            commands.append("write -z \(offset) \(512 * (1 + random.next() % 256))")
        }
        for _ in 0..<discards {
            let offset = (random.next() % limit) & ~UInt64(65535)
            commands.append("discard \(offset) \(65536 * (1 + random.next() % 4))")
        }
        // qemu-io takes many -c in one run; chunk to keep the command line short.
        for start in stride(from: 0, to: commands.count, by: 200) {
            try Tools.qemuIO(disk, format: "qcow2", Array(commands[start..<min(commands.count, start + 200)]))
        }
    }

    func virtualSize() throws -> UInt64 {
        let info = try Tools.qemuImg("info", "--output=json", disk)
        let json = try JSONHelpers.parse(info.stdout) as? [String: Any]
        return UInt64(json?["virtual-size"] as? Int ?? 0)
    }

    /// A raw copy of the disk as it is now (the reference for the next backup).
    func snapshotReference() throws {
        let path = dir.file("ref\(references.count)-\(UUID().uuidString.prefix(6)).raw")
        try Tools.qemuImg("convert", "-O", "raw", disk, path)
        references.append(path)
    }

    /// One backup followed by a reference of the disk's contents.
    @discardableResult
    func backup(_ extra: [String] = []) throws -> [String: Any] {
        let out = try qbackup(["backup", disk, "--repo", repo, "--output", "json"] + extra)
        try snapshotReference()
        return (try JSONHelpers.parse(out.stdout) as? [String: Any]) ?? [:]
    }

    func layers() throws -> [[String: Any]] {
        let out = try qbackup(["list", repo, "--output", "json"])
        let json = try JSONHelpers.parse(out.stdout) as? [String: Any]
        return json?["layers"] as? [[String: Any]] ?? []
    }

    /// `qemu-img compare` of two images (any formats); true when identical.
    func same(_ a: String, _ b: String) throws -> Bool {
        try Tools.run("qemu-img", ["compare", a, b]).status == 0
    }

    /// Restores layer `index` as raw and compares it with `reference`.
    func expectRestore(_ index: Int, equals reference: String, format: String = "raw",
                       sourceLocation: SourceLocation = #_sourceLocation) throws {
        let out = dir.file("restore-\(index)-\(UUID().uuidString.prefix(4)).\(format)")
        try qbackup(["restore", repo, "--to", out, "--at", String(index), "--format", format],
                    sourceLocation: sourceLocation)
        #expect(try same(out, reference), "restore of layer \(index) differs from its reference",
                sourceLocation: sourceLocation)
        try? FileManager.default.removeItem(atPath: out)
    }

    /// `repo` (a copy of this scenario's repository) lists exactly the points `kept`, each of
    /// which restores byte-exact to its reference, and verifies; `step` names the case in failures.
    func expectKeeps(_ kept: [Int], in repo: String, step: String, sourceLocation: SourceLocation = #_sourceLocation)
        throws
    {
        let list = try qbackup(["list", repo, "--output", "json"], sourceLocation: sourceLocation)
        let layers = (try JSONHelpers.parse(list.stdout) as? [String: Any])?["layers"] as? [[String: Any]] ?? []
        #expect(layers.map { $0["index"] as? Int ?? -1 } == kept, "\(step)", sourceLocation: sourceLocation)
        for k in kept {
            let out = dir.file("restore-\(UUID().uuidString.prefix(6))-\(k).raw")
            try qbackup(["restore", repo, "--to", out, "--at", String(k), "--format", "raw"], sourceLocation: sourceLocation)
            #expect(try same(out, references[k]), "\(step): kept point \(k) differs", sourceLocation: sourceLocation)
            try FileManager.default.removeItem(atPath: out)
        }
        try qbackup(["verify", repo], sourceLocation: sourceLocation)
    }

    /// `qemu-img check` is clean (exit 0) on `path`.
    func expectQemuCheckClean(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try Tools.run("qemu-img", ["check", path])
        #expect(result.status == 0, "qemu-img check \(path): \(result.stdout)\(result.stderr)", sourceLocation: sourceLocation)
    }

    func layerPath(_ layer: [String: Any]) -> String { "\(repo)/\(layer["file"] as? String ?? "")" }
}
