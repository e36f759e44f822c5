import Foundation
import Testing
import TestSupport

/// Issue 17 item 5 (DESIGN "Command line"): with `--output json` a command whose JSON is an
/// object prints exactly one object on stdout — with its warnings as `"warnings"`, or on failure
/// `{"error": {message, code, file, offset, region}}` besides the stderr line, with the same exit
/// status; qemu-img-shaped arrays (map, bitmap dump, info --backing-chain) keep both on stderr.
@Suite struct JSONReportTests {
    static func object(_ result: Tools.Result, _ label: String, sourceLocation: SourceLocation = #_sourceLocation) -> [String: Any] {
        let parsed = try? JSONHelpers.parse(result.stdout) as? [String: Any]
        #expect(parsed != nil, "\(label): stdout is not one JSON object: '\(result.stdout)'", sourceLocation: sourceLocation)
        return parsed ?? [:]
    }

    @Test func anErrorIsAlsoOneJSONObject() throws {
        let dir = TempDir()
        let good = dir.file("good.qcow2")
        let bad = dir.file("bad.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", good, "16M")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", bad, "16M")
        try poke(bad, at: 40, be(UInt64(0x30001)))   // l1_table_offset not cluster aligned
        let repo = dir.file("repo")
        try FileManager.default.createDirectory(atPath: repo, withIntermediateDirectories: true)
        try Data("{".utf8).write(to: URL(fileURLWithPath: repo + "/manifest.json"))
        let missing = dir.file("missing.qcow2")
        // (arguments, the file the error names, its offset when the error has one)
        let cases: [([String], String?, Int?)] = [
            (["info", bad], bad, 40),
            (["info", missing], missing, nil),
            (["check", bad], bad, 40),
            (["compare", good, missing], missing, nil),
            (["flatten", bad, dir.file("out.qcow2")], bad, 40),
            (["commit", bad], bad, 40),
            (["create", good, "1M"], nil, nil),
            (["bitmap", "list", bad], bad, 40),
            (["bitmap", "add", bad, "b"], bad, 40),
            (["backup", bad, "--repo", dir.file("new")], bad, 40),
            (["list", repo], repo + "/manifest.json", nil),
            (["restore", repo, "--to", dir.file("r.raw")], repo + "/manifest.json", nil),
            (["verify", repo], repo + "/manifest.json", nil),
            (["merge", repo, "--keep", "1"], repo + "/manifest.json", nil),
        ]
        for (args, file, offset) in cases {
            let label = args.joined(separator: " ")
            let human = try QBackupBinary.run(args)
            let result = try QBackupBinary.run(args + ["--output", "json"])
            #expect(human.status != 0 && result.status == human.status, "\(label): \(human.status) vs \(result.status)")
            #expect(result.failedCleanly, "\(label): \(result.stderr)")
            let error = Self.object(result, label)["error"] as? [String: Any]
            let line = result.errorLines.first.map { String($0.dropFirst("qbackup: error: ".count)) }
            #expect(error?["message"] as? String == line, "\(label): \(error ?? [:]) vs \(line ?? "")")
            #expect(error?["code"] is String, "\(label)")
            if let file { #expect(error?["file"] as? String == file, "\(label): \(error ?? [:])") }
            if let offset { #expect(error?["offset"] as? Int == offset, "\(label): \(error ?? [:])") }
            #expect(Self.object(result, label)["warnings"] as? [Any] != nil, "\(label)")
        }
        // Arrays shaped like qemu-img's: the error stays on stderr alone.
        for args in [["map", bad], ["info", "--backing-chain", bad], ["bitmap", "dump", bad, "b"]] {
            let result = try QBackupBinary.run(args + ["--output", "json"])
            #expect(result.failedCleanly && result.stdout.isEmpty, "\(args): '\(result.stdout)' \(result.stderr)")
        }
    }

    /// Warnings (the damage warning of a read-only command, -U's warning) are in the object too.
    @Test func warningsAreInTheObject() throws {
        let dir = TempDir()
        let image = dir.file("leaky.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, "16M")
        try Tools.qemuIO(image, format: "qcow2", ["write 0 64k"])
        let clean = try QBackupBinary.run(["info", image, "--output", "json"])
        #expect(clean.status == 0 && clean.stderr.isEmpty)
        #expect(Self.object(clean, "clean")["warnings"] as? [String] == [], "\(clean.stdout)")
        // Refcount 2 for the L2 table (refcount block at 0x20000, cluster 4): damage a read does not need.
        try poke(image, at: 0x20000 + 8, be(UInt16(2)))
        for args in [["info", image], ["info", "-U", image], ["bitmap", "list", image], ["compare", image, image],
                     ["flatten", image, dir.file("flat-\(UUID().uuidString.prefix(4)).qcow2")]] {
            let result = try QBackupBinary.run(args + ["--output", "json"])
            #expect(result.status == 0, "\(args): \(result.stderr)")
            let stderrWarnings = result.stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: warning: ") }
                .map { String($0.dropFirst("qbackup: warning: ".count)) }
            let warnings = Self.object(result, "\(args)")["warnings"] as? [String]
            #expect(!stderrWarnings.isEmpty && warnings == stderrWarnings, "\(args): \(warnings ?? []) vs \(stderrWarnings)")
            #expect(warnings?.contains { $0.contains("run 'qbackup check'") } == true, "\(args): \(warnings ?? [])")
        }
        // map's JSON is qemu-img's array: the warning stays on stderr.
        let map = try QBackupBinary.run(["map", image, "--output", "json"])
        let mapped = try JSONHelpers.parse(map.stdout)
        #expect(map.status == 0 && mapped is [Any] && map.stderr.contains("qbackup: warning: "))
    }

    /// verify's problems are objects: kind, layer (the point's index), file, offset, message.
    @Test func verifyProblemsAreObjects() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "16M")
        for pattern in 1...2 {
            try Tools.qemuIO(disk, format: "qcow2", ["write -P \(pattern) 0 1M"])
            #expect(try QBackupBinary.run(["backup", disk, "--repo", repo, "-q"]).status == 0)
        }
        let list = Self.object(try QBackupBinary.run(["list", repo, "--output", "json"]), "list")
        let layer = try #require((list["layers"] as? [[String: Any]])?.last)
        let file = try #require(layer["file"] as? String)
        let size = try #require(layer["file-size"] as? Int)
        let at = UInt64(size - 1000)
        try poke("\(repo)/\(file)", at: at, [0xff ^ (try peek("\(repo)/\(file)", at: at, count: 1)[0])])
        let result = try QBackupBinary.run(["verify", repo, "--output", "json"])
        #expect(result.status == 1, "\(result.stderr)")
        let problems = Self.object(result, "verify")["problems"] as? [[String: Any]] ?? []
        let checksum = problems.first { $0["kind"] as? String == "checksum" }
        #expect(checksum?["layer"] as? Int == layer["index"] as? Int, "\(problems)")
        #expect(checksum?["file"] as? String == file, "\(problems)")
        #expect(checksum?["offset"] as? Int == Int(at / (4 << 20) * (4 << 20)), "\(problems)")
        #expect((checksum?["message"] as? String)?.contains("checksum mismatch") == true, "\(problems)")
        // The human output still lists the problem in one line.
        let human = try QBackupBinary.run(["verify", repo])
        #expect(human.status == 1 && human.stdout.contains("problem: layer \(layer["index"] as? Int ?? -1) (\(file)): checksum"),
                "\(human.stdout)")
    }

    /// A folder with no backup yet lists with the same keys as a repository (null where unknown).
    @Test func listOfANewRepositoryKeepsItsKeys() throws {
        let dir = TempDir()
        let result = try QBackupBinary.run(["list", dir.file("none-yet"), "--output", "json"])
        #expect(result.status == 0, "\(result.stderr)")
        let json = Self.object(result, "list")
        for key in ["id", "bitmap", "source", "replica-of", "virtual-size", "layers", "warnings"] {
            #expect(json.keys.contains(key), "no \(key): \(result.stdout)")
        }
        #expect((json["layers"] as? [Any])?.isEmpty == true)
    }
    /// A usage error (exit 2, the argument parser's or a command's validation) is the error object
    /// too (code "usage"), with `--output json` or `--output=json`; arrays and `restore --to -` keep
    /// stdout empty, as does a usage error without --output json.
    @Test func aUsageErrorIsAlsoOneJSONObject() throws {
        let dir = TempDir()
        let image = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, "16M")
        let repo = dir.file("repo")
        let cases: [[String]] = [
            ["info"],                                                       // missing argument
            ["info", image, "--bogus"],                                     // unknown option
            ["bitmap", "add", image],                                       // missing argument of a nested command
            ["bitmap", "add", image, "b", "--granularity", "3K"],          // bad value
            ["backup", image, "--repo", repo, "--full", "--incremental"],   // validate()
            ["merge", repo],                                                // no retention rule
            ["restore", repo, "--to", dir.file("out.raw"), "--at", "2026-13-45"],
            ["verify"],
            ["nosuchcommand"],
        ]
        for args in cases {
            for form in [["--output", "json"], ["--output=json"]] {
                let label = (args + form).joined(separator: " ")
                let result = try QBackupBinary.run(args + form)
                #expect(result.status == 2, "\(label): \(result.status) \(result.stderr)")
                let line = result.errorLines.first.map { String($0.dropFirst("qbackup: error: ".count)) }
                let json = Self.object(result, label)
                let error = json["error"] as? [String: Any]
                #expect(error?["code"] as? String == "usage", "\(label): \(json)")
                #expect(line != nil && error?["message"] as? String == line, "\(label): \(json) vs \(result.stderr)")
                #expect(json["warnings"] as? [String] == [], "\(label): \(json)")
            }
            let human = try QBackupBinary.run(args)
            #expect(human.status == 2 && human.stdout.isEmpty, "\(args): '\(human.stdout)'")
        }
        for args in [["map", "--output", "json"], ["bitmap", "dump", image, "--output", "json"],
                     ["info", "--backing-chain", "--output", "json", image, "--bogus"],
                     ["restore", repo, "--to", "-", "--output", "json"]] {
            let result = try QBackupBinary.run(args)
            #expect(result.status == 2 && result.stdout.isEmpty && result.stderr.hasPrefix("qbackup: error: "),
                    "\(args): '\(result.stdout)' \(result.stderr)")
        }
    }

    /// bitmap add/remove/clear/enable/disable/merge report what they did: the operation, the image,
    /// the bitmap's name and the bitmap as `bitmap list` shows it afterwards (null once removed).
    @Test func bitmapEditsReportTheirResult() throws {
        let dir = TempDir()
        let image = dir.file("disk.qcow2")
        let other = dir.file("other.qcow2")
        for path in [image, other] { try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "16M") }
        func run(_ args: [String], on path: String = image) throws -> [String: Any] {
            let result = try QBackupBinary.run(["bitmap"] + args.prefix(1) + [path] + args.dropFirst() + ["--output", "json"])
            #expect(result.status == 0 && result.stderr.isEmpty, "\(args): \(result.stderr)")
            let json = Self.object(result, "\(args)")
            #expect(json["operation"] as? String == args[0] && json["image"] as? String == path, "\(json)")
            #expect(json["warnings"] as? [String] == [], "\(json)")
            return json
        }
        func bitmap(_ json: [String: Any]) -> [String: Any] { json["bitmap"] as? [String: Any] ?? [:] }
        let added = try run(["add", "b0", "--granularity", "128K"])
        #expect(added["name"] as? String == "b0")
        #expect(bitmap(added)["name"] as? String == "b0" && bitmap(added)["granularity"] as? Int == 128 << 10
                && bitmap(added)["enabled"] as? Bool == true && bitmap(added)["dirty-bytes"] as? Int == 0, "\(added)")
        // QEMU tracks a write in the enabled bitmap: 64 KiB at 1 MiB dirties one 128 KiB granule.
        try Tools.qemuIO(image, format: "qcow2", ["write -P 7 1M 64k"])
        #expect(bitmap(try run(["disable", "b0"]))["enabled"] as? Bool == false)
        let enabled = try run(["enable", "b0"])
        #expect(bitmap(enabled)["enabled"] as? Bool == true && bitmap(enabled)["dirty-bytes"] as? Int == 128 << 10, "\(enabled)")
        _ = try run(["add", "b1", "--disabled"], on: other)
        try Tools.qemuIO(image, format: "qcow2", ["write -P 8 4M 64k"])
        _ = try run(["add", "b1", "--granularity", "64K"])
        let merged = try run(["merge", "b1", "--source", "b0", "--source", "b1", "--source-image", image, "--source-image", other])
        #expect(bitmap(merged)["name"] as? String == "b1" && bitmap(merged)["dirty-bytes"] as? Int == 256 << 10, "\(merged)")
        let sources = merged["sources"] as? [[String: String]]
        #expect(sources == [["image": image, "name": "b0"], ["image": other, "name": "b1"]], "\(merged)")
        let cleared = try run(["clear", "b0"])
        #expect(bitmap(cleared)["dirty-bytes"] as? Int == 0, "\(cleared)")
        let removed = try run(["remove", "b0"])
        #expect(removed["name"] as? String == "b0" && removed["bitmap"] is NSNull, "\(removed)")
        // What QEMU sees agrees.
        let info = try Tools.qemuImg("info", "--output=json", image).stdout
        #expect(!info.contains("\"b0\"") && info.contains("\"b1\""), "\(info)")
        try Tools.qemuImg("check", image)
    }
}
