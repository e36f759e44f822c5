import Foundation
import Testing
import TestSupport

/// Issue 11 items 8-10: a repository's files are untrusted. A symbolic link among them
/// (layer, manifest temp, lock file) is refused with one `qbackup: error:` line, and the
/// file it points to outside the repository is left untouched.
@Suite struct RepositoryFilesTests {
    static func expectOneErrorLine(_ result: Tools.Result, naming word: String,
                                   sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(result.status == 1, "exit \(result.status): \(result.stdout)\(result.stderr)", sourceLocation: sourceLocation)
        #expect(result.stderr.hasPrefix("qbackup: error:") && result.stderr.split(separator: "\n").count == 1,
                "\(result.stderr)", sourceLocation: sourceLocation)
        #expect(result.stderr.contains(word) && result.stderr.contains("symbolic link"), "\(result.stderr)",
                sourceLocation: sourceLocation)
    }

    static func twoPoints(seed: UInt64) throws -> BackupScenario {
        let s = try BackupScenario(size: "16M", seed: seed)
        try s.dirty(writes: 6, maxOffset: 14 << 20)
        try s.backup()
        try s.dirty(writes: 3, maxOffset: 14 << 20)
        try s.backup()
        return s
    }

    /// Item 8: the full layer is a symlink to an image outside; merge wrote into it.
    @Test func mergeRefusesASymlinkedLayer() throws {
        let s = try Self.twoPoints(seed: 71)
        let full = s.layerPath(try s.layers()[0])
        let outside = s.dir.file("outside.qcow2")
        try FileManager.default.moveItem(atPath: full, toPath: outside)
        try FileManager.default.createSymbolicLink(atPath: full, withDestinationPath: outside)
        let before = try Data.contents(of: outside)
        let manifest = try Data.contents(of: s.repo + "/manifest.json")
        let result = try QBackupBinary.run(["merge", s.repo, "--keep", "1"])
        Self.expectOneErrorLine(result, naming: (full as NSString).lastPathComponent)
        #expect(try Data.contents(of: outside) == before, "merge wrote through the symlink")
        #expect(try Data.contents(of: s.repo + "/manifest.json") == manifest)
        // Restore and verify refuse to read through it too.
        Self.expectOneErrorLine(try QBackupBinary.run(["restore", s.repo, "--to", s.dir.file("r.raw"), "--at", "0"]),
                                naming: (full as NSString).lastPathComponent)
        #expect(try QBackupBinary.run(["verify", s.repo]).stdout.contains("symbolic link"))
    }

    /// Item 9: `manifest.json.tmp` is a symlink and a pending-merge record makes backup save the
    /// manifest first (finishing the merge): it wrote the manifest into the outside file.
    @Test func backupRefusesASymlinkedManifestTemp() throws {
        let s = try Self.twoPoints(seed: 72)
        let path = s.repo + "/manifest.json"
        var manifest = try #require(try JSONHelpers.parse(try String(contentsOfFile: path, encoding: .utf8)) as? [String: Any])
        let layer = try #require((manifest["layers"] as? [[String: Any]])?[1])
        manifest["pending-merge"] = ["file": layer["file"] ?? "", "sha256": layer["sha256"] ?? "",
                                     "fileSize": layer["file-size"] ?? 0, "folded": 1]
        try JSONSerialization.data(withJSONObject: manifest).write(to: URL(fileURLWithPath: path))
        let outside = s.dir.file("outside.txt")
        try Data("keep me\n".utf8).write(to: URL(fileURLWithPath: outside))
        try FileManager.default.createSymbolicLink(atPath: path + ".tmp", withDestinationPath: outside)
        let result = try QBackupBinary.run(["backup", s.disk, "--repo", s.repo])
        Self.expectOneErrorLine(result, naming: "manifest.json.tmp")
        #expect(try String(contentsOfFile: outside, encoding: .utf8) == "keep me\n", "the manifest was written outside")
    }

    /// Item 10: a symlinked `.qbackup.lock` pointing at a name outside; list and restore created it.
    @Test(arguments: ["list", "restore", "verify", "backup", "merge"])
    func commandsRefuseASymlinkedLockFile(_ command: String) throws {
        let s = try Self.twoPoints(seed: 73)
        let lock = s.repo + "/.qbackup.lock"
        let outside = s.dir.file("created-outside")
        try? FileManager.default.removeItem(atPath: lock)
        try FileManager.default.createSymbolicLink(atPath: lock, withDestinationPath: outside)
        let args: [String] = switch command {
        case "restore": ["restore", s.repo, "--to", s.dir.file("r.raw")]
        case "backup": ["backup", s.disk, "--repo", s.repo]
        case "merge": ["merge", s.repo, "--keep", "1"]
        default: [command, s.repo]
        }
        let result = try QBackupBinary.run(args)
        Self.expectOneErrorLine(result, naming: ".qbackup.lock")
        #expect(!FileManager.default.fileExists(atPath: outside), "\(command) created a file outside the repository")
        #expect(!FileManager.default.fileExists(atPath: s.dir.file("r.raw")))
    }

    /// A symlinked manifest is not read (it could be any file of the machine).
    @Test func aSymlinkedManifestIsRefused() throws {
        let s = try Self.twoPoints(seed: 74)
        let path = s.repo + "/manifest.json"
        let outside = s.dir.file("manifest-outside.json")
        try FileManager.default.moveItem(atPath: path, toPath: outside)
        try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: outside)
        Self.expectOneErrorLine(try QBackupBinary.run(["list", s.repo]), naming: "manifest.json")
    }

    /// A backing name that leads out of the folder is refused before the file is opened.
    @Test func aBackingFileOutsideTheFolderIsRefused() throws {
        let s = try Self.twoPoints(seed: 75)
        let layers = try s.layers()
        let outside = s.dir.file("elsewhere.qcow2")
        try FileManager.default.copyItem(atPath: s.layerPath(layers[0]), toPath: outside)
        try Tools.qemuImg("rebase", "-u", "-f", "qcow2", "-b", "../elsewhere.qcow2", "-F", "qcow2", s.layerPath(layers[1]))
        let result = try QBackupBinary.run(["restore", s.repo, "--to", s.dir.file("r.raw")])
        #expect(result.status == 1 && result.stderr.contains("inside the repository folder"), "\(result.stderr)")
    }

    /// A layer replaced by a FIFO is refused at once: opening it must not wait for a writer.
    @Test(arguments: ["restore", "verify", "merge"])
    func aFIFOLayerIsRefusedWithoutHanging(_ command: String) throws {
        let s = try Self.twoPoints(seed: 76)
        let top = s.layerPath(try s.layers()[1])
        try FileManager.default.removeItem(atPath: top)
        try Tools.run("mkfifo", [top])
        let args: [String] = switch command {
        case "restore": ["restore", s.repo, "--to", s.dir.file("r.raw"), "--format", "raw"]
        case "merge": ["merge", s.repo, "--keep", "1"]
        default: ["verify", s.repo]
        }
        let result = try Bounded.run([try QBackupBinary.path()] + args, mebibytes: 1024, seconds: 20)
        #expect(result.status == 1, "\(command): exit \(result.status) (124 or 137: it hung and the bound stopped it) \(result.stderr)")
        #expect((result.stdout + result.stderr).contains("FIFO"), "\(command): \(result.stdout)\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: s.dir.file("r.raw")))
    }

    /// merge's temporary file name is a symlink to a file outside: it is neither followed nor written.
    @Test func mergeNeverWritesThroughASymlinkedTemporaryName() throws {
        let s = try Self.twoPoints(seed: 77)
        let layers = try s.layers()
        // A hard-linked copy makes merge write point 1 as a new file under LAYER.merge.partial.
        try Tools.run("cp", ["-al", s.repo, s.dir.file("snap")])
        let outside = s.dir.file("outside.bin")
        try Data("keep me\n".utf8).write(to: URL(fileURLWithPath: outside))
        let temp = s.layerPath(layers[1]) + ".merge.partial"
        try FileManager.default.createSymbolicLink(atPath: temp, withDestinationPath: outside)
        _ = try QBackupBinary.run(["merge", s.repo, "--keep", "1"])
        #expect(try String(contentsOfFile: outside, encoding: .utf8) == "keep me\n", "merge wrote through the symlink")
        for (k, reference) in s.references.enumerated() {
            let out = s.dir.file("snap-\(k).raw")
            try s.qbackup(["restore", s.dir.file("snap"), "--to", out, "--at", String(k), "--format", "raw"])
            #expect(try s.same(out, reference))
        }
    }
}
