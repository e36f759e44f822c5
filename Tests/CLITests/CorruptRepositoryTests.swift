import Foundation
import Testing
import TestSupport

/// The corrupt-repository corpus: a repository (a full and an incremental layer
/// made by QEMU, and a manifest) damaged one manifest field or layer file at a
/// time, run through `list`, `restore` and `verify`. Each must exit 0 or 1, on failure
/// with one `qbackup: error:` line naming the manifest or layer, quickly, with
/// bounded memory, leaving the manifest and layers byte-identical.
@Suite struct CorruptRepositoryTests {
    struct Damage: CustomTestStringConvertible, Sendable {
        var name: String
        /// Words the error line must contain when the command fails.
        var expect: [String]
        /// `verify` must report this damage (exit 1): the manifest no longer matches the files.
        var verifyFails = false
        var apply: @Sendable (_ repo: String, _ manifest: inout [String: Any]) throws -> Void
        var testDescription: String { name }
    }

    static func layer(_ m: inout [String: Any], _ i: Int, _ key: String, _ value: Any?) {
        guard var layers = m["layers"] as? [[String: Any]] else { return }
        layers[i][key] = value
        m["layers"] = layers
    }

    static let manifest = ["manifest"]

    static let damages: [Damage] = [
        Damage(name: "format = 'other'", expect: manifest) { _, m in m["format"] = "other" },
        Damage(name: "version = 2", expect: manifest) { _, m in m["version"] = 2 },
        Damage(name: "version = -1", expect: manifest) { _, m in m["version"] = -1 },
        Damage(name: "version is a string", expect: manifest) { _, m in m["version"] = "1" },
        Damage(name: "id is not hex", expect: manifest) { _, m in m["id"] = "not hex!" },
        Damage(name: "id empty", expect: manifest) { _, m in m["id"] = "" },
        Damage(name: "virtual-size negative", expect: manifest) { _, m in m["virtual-size"] = -1 },
        Damage(name: "virtual-size 2^63", expect: manifest) { _, m in m["virtual-size"] = UInt64(1) << 63 },
        Damage(name: "cluster-size 1000", expect: manifest) { _, m in m["cluster-size"] = 1000 },
        Damage(name: "cluster-size 0", expect: manifest) { _, m in m["cluster-size"] = 0 },
        Damage(name: "bitmap empty", expect: manifest) { _, m in m["bitmap"] = "" },
        Damage(name: "layers missing", expect: manifest) { _, m in m["layers"] = nil },
        Damage(name: "layers is an object", expect: manifest) { _, m in m["layers"] = ["file": "x"] },
        Damage(name: "layer 0 kind incremental", expect: manifest) { _, m in layer(&m, 0, "kind", "incremental") },
        Damage(name: "layer 0 kind unknown", expect: manifest) { _, m in layer(&m, 0, "kind", "differential") },
        Damage(name: "layer 0 file escapes the folder", expect: manifest) { _, m in layer(&m, 0, "file", "../full-0000.qcow2") },
        Damage(name: "layer 0 file absolute", expect: manifest) { _, m in layer(&m, 0, "file", "/etc/passwd") },
        Damage(name: "layer 0 file hidden", expect: manifest) { _, m in layer(&m, 0, "file", ".qbackup.lock") },
        Damage(name: "layer 0 file missing", expect: ["missing-0000.qcow2"]) { _, m in layer(&m, 0, "file", "missing-0000.qcow2") },
        Damage(name: "layer 1 file same as layer 0", expect: manifest) { _, m in layer(&m, 1, "file", "full-0000.qcow2") },
        Damage(name: "layer 0 sha256 short", expect: manifest) { _, m in layer(&m, 0, "sha256", "00") },
        Damage(name: "layer 0 created is a number", expect: manifest) { _, m in layer(&m, 0, "created", 5) },
        Damage(name: "layer 1 virtual-size 2^62", expect: manifest) { _, m in layer(&m, 1, "virtual-size", UInt64(1) << 62) },
        Damage(name: "pending-merge inconsistent", expect: manifest) { _, m in
            m["pending-merge"] = ["file": "inc-0001.qcow2", "sha256": "00", "fileSize": 1, "folded": 7]
        },
        Damage(name: "manifest truncated", expect: manifest) { repo, _ in
            let path = "\(repo)/manifest.json"
            try Tools.run("truncate", ["-s", "100", path])
        },
        Damage(name: "manifest empty", expect: manifest) { repo, _ in try Tools.run("truncate", ["-s", "0", "\(repo)/manifest.json"]) },
        Damage(name: "manifest binary junk", expect: manifest) { repo, _ in
            try Data((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 151) }).write(to: URL(fileURLWithPath: "\(repo)/manifest.json"))
        },
        Damage(name: "manifest larger than 64 MiB (sparse)", expect: manifest) { repo, _ in
            try Tools.run("truncate", ["-s", "65M", "\(repo)/manifest.json"])
        },
        Damage(name: "manifest nested 100000 deep", expect: manifest) { repo, _ in
            let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
            try Data(deep.utf8).write(to: URL(fileURLWithPath: "\(repo)/manifest.json"))
        },
        Damage(name: "layer 1 file truncated to 0", expect: ["inc-0001.qcow2"]) { repo, _ in
            try Tools.run("truncate", ["-s", "0", "\(repo)/inc-0001.qcow2"])
        },
        Damage(name: "layer 1 backing file renamed inside the image", expect: ["inc-0001.qcow2"]) { repo, _ in
            try Tools.qemuImg("rebase", "-u", "-f", "qcow2", "-b", "other-0000.qcow2", "-F", "qcow2", "\(repo)/inc-0001.qcow2")
        },
        Damage(name: "layer 1 sha256 of other bytes", expect: [], verifyFails: true) { _, m in layer(&m, 1, "sha256", String(repeating: "0", count: 64)) },
        Damage(name: "layer 1 one data byte changed", expect: [], verifyFails: true) { repo, _ in
            let path = "\(repo)/inc-0001.qcow2"
            let size = try FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64 ?? 1
            let old = try peek(path, at: size - 1, count: 1)[0]
            try poke(path, at: size - 1, [old ^ 0xff])
        },
        Damage(name: "layer 0 file-size wrong", expect: [], verifyFails: true) { _, m in layer(&m, 0, "file-size", 12345) },
        Damage(name: "layer 1 L1 table offset past end of file", expect: ["inc-0001.qcow2", "0x28"], verifyFails: true) { repo, _ in
            try poke("\(repo)/inc-0001.qcow2", at: 40, be(UInt64(1) << 40))
        },
    ]

    /// A repository of two layers made by QEMU, with a manifest describing them.
    static func makeRepository(_ dir: TempDir) throws -> (String, [String: Any]) {
        let repo = dir.file("repo")
        try FileManager.default.createDirectory(atPath: repo, withIntermediateDirectories: true)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "\(repo)/full-0000.qcow2", "4M")
        try Tools.qemuIO("\(repo)/full-0000.qcow2", format: "qcow2", ["write -P 0x11 0 1M"])
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "full-0000.qcow2", "-F", "qcow2", "\(repo)/inc-0001.qcow2", "4M")
        try Tools.qemuIO("\(repo)/inc-0001.qcow2", format: "qcow2", ["write -P 0x22 512k 64k"])
        func layer(_ file: String, _ kind: String) throws -> [String: Any] {
            let path = "\(repo)/\(file)"
            let sum = try Tools.run("sha256sum", [path]).stdout.prefix(64)
            let size = try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int ?? 0
            return ["file": file, "kind": kind, "created": "2024-05-01T02:00:00Z", "bytes-copied": 65536, "file-size": size,
                    "virtual-size": 4 << 20, "sha256": String(sum)]
        }
        let manifest: [String: Any] = [
            "format": "qbackup-repository", "version": 1, "id": "0123456789abcdef", "virtual-size": 4 << 20,
            "cluster-size": 65536, "bitmap": "qbackup-0123456789abcdef", "source": "/var/lib/images/disk.qcow2",
            "layers": [try layer("full-0000.qcow2", "full"), try layer("inc-0001.qcow2", "incremental")],
        ]
        return (repo, manifest)
    }

    static func write(_ manifest: [String: Any], to repo: String) throws {
        let data = try JSONSerialization.data(withJSONObject: manifest, options: [.sortedKeys])
        try data.write(to: URL(fileURLWithPath: "\(repo)/manifest.json"))
    }

    /// The repository's files and their bytes, but the lock file readers create.
    static func snapshot(_ repo: String) throws -> [String: Data] {
        var out: [String: Data] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: repo) where name != ".qbackup.lock" {
            out[name] = try Data.contents(of: "\(repo)/\(name)")
        }
        return out
    }

    @Test func pristineRepositoryListsAndRestores() throws {
        let dir = TempDir("qbackup-corrupt-repo")
        let (repo, manifest) = try Self.makeRepository(dir)
        try Self.write(manifest, to: repo)
        let list = try QBackupBinary.run(["list", repo, "--output", "json"])
        #expect(list.status == 0, "\(list.stderr)")
        let restore = try QBackupBinary.run(["restore", repo, "--to", dir.file("out.raw"), "--format", "raw"])
        #expect(restore.status == 0, "\(restore.stderr)")
        try Tools.qemuImg("compare", "-f", "raw", "-F", "qcow2", dir.file("out.raw"), "\(repo)/inc-0001.qcow2")
        let verify = try QBackupBinary.run(["verify", repo])
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
    }

    @Test(arguments: damages)
    func damagedRepository(_ damage: Damage) throws {
        let dir = TempDir("qbackup-corrupt-repo")
        var (repo, manifest) = try Self.makeRepository(dir)
        try Self.write(manifest, to: repo)
        let original = JSONHelpers.canonical(manifest)
        try damage.apply(repo, &manifest)
        // Field damages change the dictionary; file damages changed the files already.
        if JSONHelpers.canonical(manifest) != original { try Self.write(manifest, to: repo) }
        let before = try Self.snapshot(repo)
        let binary = try QBackupBinary.path()
        let out = dir.file("out.raw")
        var statuses: [String] = []
        for args in [["list", repo, "--output", "json"], ["restore", repo, "--to", out, "--format", "raw"], ["verify", repo]] {
            let label = "\(damage.name): \(args[0])"
            let started = Date()
            let result = try Bounded.run([binary] + args, mebibytes: 1024, seconds: 10)
            let elapsed = Date().timeIntervalSince(started)
            statuses.append("\(args[0])=\(result.status)")
            #expect([0, 1].contains(result.status), "\(label): exit \(result.status), stderr: \(result.stderr)")
            #expect(elapsed < 5, "\(label) took \(elapsed) s")
            if args[0] == "verify" && damage.verifyFails {
                #expect(result.status == 1, "\(label): verify did not notice: \(result.stdout)")
            }
            // verify lists the problems it found on stdout (exit 1, no error line; a file the damaged
            // manifest no longer names is warned about as foreign).
            let lines = result.stderr.split(separator: "\n").filter { !$0.hasPrefix("qbackup: warning: ") }
            let listedProblems = args[0] == "verify" && lines.isEmpty && result.stdout.contains("problem")
            if result.status == 1 && !listedProblems {
                #expect(lines.count == 1 && lines[0].hasPrefix("qbackup: error: "), "\(label): want one error line: \(result.stderr)")
                #expect(result.stderr.contains(repo), "\(label): the error names no file of the repository: \(result.stderr)")
                for word in damage.expect {
                    #expect(result.stderr.contains(word), "\(label): '\(word)' missing from: \(result.stderr)")
                }
                if args[0] == "restore" {
                    #expect(!FileManager.default.fileExists(atPath: out), "\(label) failed but left its output behind")
                }
            }
            #expect(try Self.snapshot(repo) == before, "\(label) changed the repository")
            try? FileManager.default.removeItem(atPath: out)
        }
        print("corrupt repository: \(damage.name): \(statuses.joined(separator: " "))")
    }
}
