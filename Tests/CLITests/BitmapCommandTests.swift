import Foundation
import Testing
import TestSupport

/// `qbackup bitmap …` end to end, QEMU as the judge.
@Suite struct BitmapCommandTests {
    static func qemuBitmaps(_ path: String) throws -> [String: [String: Any]] {
        let info = try JSONHelpers.parse(try Tools.qemuImg("info", "--output=json", path).stdout) as? [String: Any]
        let list = ((info?["format-specific"] as? [String: Any])?["data"] as? [String: Any])?["bitmaps"] as? [[String: Any]] ?? []
        return Dictionary(uniqueKeysWithValues: list.map { ($0["name"] as? String ?? "", $0) })
    }

    static func dump(_ path: String, _ name: String) throws -> [QemuNBD.Extent] {
        let out = try QBackupBinary.run(["bitmap", "dump", path, name, "--output", "json"])
        #expect(out.status == 0, "\(out.stderr)")
        let items = try JSONHelpers.parse(out.stdout) as? [[String: Any]] ?? []
        return items.map {
            QemuNBD.Extent(start: UInt64($0["start"] as? Int ?? -1), length: UInt64($0["length"] as? Int ?? -1),
                           dirty: $0["dirty"] as? Bool ?? false)
        }
    }

    @Test func workflowAgreesWithQemu() throws {
        let dir = TempDir()
        let path = dir.file("img.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "256M")
        #expect(try QBackupBinary.run(["bitmap", "add", path, "a"]).status == 0)
        #expect(try QBackupBinary.run(["bitmap", "add", path, "b", "--granularity", "512", "--disabled"]).status == 0)
        var qemu = try Self.qemuBitmaps(path)
        #expect(qemu["a"]?["granularity"] as? Int == 65536)
        #expect(qemu["a"]?["flags"] as? [String] == ["auto"])
        #expect(qemu["b"]?["granularity"] as? Int == 512)
        #expect(qemu["b"]?["flags"] as? [String] == [])
        #expect(try Tools.run("qemu-img", ["check", path]).status == 0)

        // QEMU writes; our dump equals qemu-nbd's dirty map.
        try Tools.qemuIO(path, format: "qcow2", ["write -P 1 1000 5000", "write -P 2 100M 3M", "write -z 200M 64k"])
        for name in ["a", "b"] {
            let nbd = try QemuNBD(image: path, bitmap: name, directory: dir)
            let theirs = try nbd.dirtyMap(bitmap: name)
            nbd.stop()
            waitForImageLocksToClear(path)
            #expect(try Self.dump(path, name) == theirs, "bitmap \(name)")
        }
        #expect(try Self.dump(path, "b").allSatisfy { !$0.dirty })

        // merge a into b, then b has a's bits (at b's finer granularity: a superset of a's blocks).
        #expect(try QBackupBinary.run(["bitmap", "merge", path, "b", "--source", "a"]).status == 0)
        let merged = try Self.dump(path, "b").filter(\.dirty)
        #expect(merged == (try Self.dump(path, "a").filter(\.dirty)))

        // enable b, clear a, remove a.
        #expect(try QBackupBinary.run(["bitmap", "enable", path, "b"]).status == 0)
        #expect(try QBackupBinary.run(["bitmap", "clear", path, "a"]).status == 0)
        #expect(try Self.dump(path, "a").allSatisfy { !$0.dirty })
        #expect(try QBackupBinary.run(["bitmap", "disable", path, "a"]).status == 0)
        qemu = try Self.qemuBitmaps(path)
        #expect(qemu["a"]?["flags"] as? [String] == [])
        #expect(qemu["b"]?["flags"] as? [String] == ["auto"])
        #expect(try QBackupBinary.run(["bitmap", "remove", path, "a"]).status == 0)
        #expect(try Self.qemuBitmaps(path).keys.sorted() == ["b"])
        #expect(try Tools.run("qemu-img", ["check", path]).status == 0)

        // list JSON is an object, as every other command's: {"bitmaps": [...]}, naming what is there.
        let list = try QBackupBinary.run(["bitmap", "list", path, "--output", "json"])
        #expect(list.status == 0)
        let object = try JSONHelpers.parse(list.stdout) as? [String: Any]
        let rows = object?["bitmaps"] as? [[String: Any]]
        #expect(rows?.compactMap { $0["name"] as? String } == ["b"], "\(list.stdout)")
    }

    /// The human DIRTY column in human sizes, the JSON in bytes.
    @Test func listShowsDirtyBytesInHumanSizes() throws {
        let dir = TempDir()
        let path = dir.file("img.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "64M")
        #expect(try QBackupBinary.run(["bitmap", "add", path, "a"]).status == 0)
        try Tools.qemuIO(path, format: "qcow2", ["write -P 1 0 3M", "write -P 2 10M 512k"])
        let human = try QBackupBinary.run(["bitmap", "list", path])
        #expect(human.status == 0, "\(human.stderr)")
        let row = human.stdout.split(separator: "\n").first { $0.hasPrefix("a ") }.map(String.init) ?? ""
        #expect(row.hasSuffix(" 3.5 MiB"), "\(human.stdout)")
        let json = try JSONHelpers.parse(try QBackupBinary.run(["bitmap", "list", path, "--output", "json"]).stdout)
        let rows = (json as? [String: Any])?["bitmaps"] as? [[String: Any]]
        #expect(rows?.first?["dirty-bytes"] as? Int == 3_670_016)
        // GRANULARITY in human sizes too (a 64 KiB default, and a 1 MiB one); JSON keeps bytes.
        #expect(try QBackupBinary.run(["bitmap", "add", path, "b", "--granularity", "1M"]).status == 0)
        let both = try QBackupBinary.run(["bitmap", "list", path]).stdout.split(separator: "\n")
        let granularity = both.dropFirst().map { $0.split(separator: " ", omittingEmptySubsequences: true) }
            .map { "\($0[0]) \($0[1]) \($0[2])" }
        #expect(granularity == ["a 64 KiB", "b 1 MiB"], "\(both)")
        let again = try JSONHelpers.parse(try QBackupBinary.run(["bitmap", "list", path, "--output", "json"]).stdout)
        #expect(((again as? [String: Any])?["bitmaps"] as? [[String: Any]])?.compactMap { $0["granularity"] as? Int }
                == [65536, 1 << 20])
    }

    @Test func inUseBitmapIsRefusedButListedAndDumped() throws {
        let dir = TempDir()
        let path = dir.file("img.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "64M")
        try Tools.qemuImg("bitmap", "--add", path, "x")
        // A writable qemu-nbd marks the bitmap in_use; SIGKILL leaves it so (a crashed VM).
        let nbd = try QemuNBD(image: path, bitmap: nil, directory: dir, readOnly: false)
        nbd.stop()
        waitForImageLocksToClear(path)
        let clear = try QBackupBinary.run(["bitmap", "clear", path, "x"])
        #expect(clear.status == 1)
        #expect(clear.stderr.hasPrefix("qbackup: error:") && clear.stderr.contains("in_use"), "\(clear.stderr)")
        #expect(try QBackupBinary.run(["bitmap", "list", path]).status == 0)
        let dump = try QBackupBinary.run(["bitmap", "dump", path, "x"])
        #expect(dump.status == 0)
        #expect((dump.stdout + dump.stderr).contains("inconsistent"))
        #expect(try QBackupBinary.run(["bitmap", "remove", path, "x"]).status == 0)
        #expect(try Self.qemuBitmaps(path).isEmpty)
    }
}
