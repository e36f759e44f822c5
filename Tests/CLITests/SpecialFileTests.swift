import Foundation
import Testing
import TestSupport

/// A FIFO, socket, character device or folder where an image or backing file should be is
/// refused before it is read (`FileDevice` opens without blocking and checks the file type):
/// every command ends at once with one error line instead of hanging (issue 11, item 11).
@Suite struct SpecialFileTests {
    /// Every command that opens an image; IMG is replaced by the path.
    static let commands: [[String]] = [
        ["info", "IMG"], ["info", "--backing-chain", "IMG"], ["map", "IMG"], ["map", "--output", "json", "IMG"],
        ["flatten", "IMG", "OUT"], ["flatten", "--format", "raw", "IMG", "OUT"], ["compare", "IMG", "IMG"],
        ["commit", "IMG"], ["bitmap", "list", "IMG"], ["bitmap", "add", "IMG", "b"], ["backup", "IMG", "--repo", "OUT"],
    ]

    /// Runs `qbackup` under `timeout`, so a hang fails the test instead of stalling the suite.
    static func run(_ arguments: [String]) throws -> Tools.Result {
        try Bounded.run([try QBackupBinary.path()] + arguments, mebibytes: 1024, seconds: 20)
    }

    static func expectRefused(_ result: Tools.Result, _ label: String, kind: String) {
        #expect(result.status != 124 && result.status != 137, "\(label): hung")
        #expect(result.failedCleanly, "\(label): exit \(result.status): \(result.stderr)")
        #expect(result.errorLines.first?.contains("is \(kind)") == true, "\(label): \(result.stderr)")
    }

    /// Whether OUT is a file, or a folder (a repository) holding any file but its lock.
    static func wroteAnOutput(_ path: String) -> Bool {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return false }
        guard isDir.boolValue else { return true }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        return names.contains { !$0.hasPrefix(".qbackup.lock") }
    }

    enum Special: String, CaseIterable, Sendable { case fifo, socket, characterDevice, folder }

    /// Makes `kind` at `path` (a character device: /dev/null, by a symbolic link).
    static func make(_ kind: Special, at path: String) throws -> String {
        switch kind {
        case .fifo:
            #expect(mkfifo(path, 0o644) == 0)
            return "a FIFO"
        case .socket:
            try Tools.run("python3", ["-c", "import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])", path])
            return "a socket"
        case .characterDevice:
            #expect(symlink("/dev/null", path) == 0)
            return "a character device"
        case .folder:
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
            return "a folder"
        }
    }

    @Test(arguments: Special.allCases)
    func asTheImage(_ special: Special) throws {
        let dir = TempDir()
        let image = dir.file("image")
        let kind = try Self.make(special, at: image)
        for command in Self.commands {
            let arguments = command.map { $0 == "IMG" ? image : $0 == "OUT" ? dir.file("out") : $0 }
            Self.expectRefused(try Self.run(arguments), command.joined(separator: " "), kind: kind)
            #expect(!Self.wroteAnOutput(dir.file("out")), "\(command)")
        }
    }

    /// The top image is fine; its backing file is not.
    @Test(arguments: [Special.fifo, .characterDevice])
    func asTheBackingFile(_ special: Special) throws {
        let dir = TempDir()
        let kind = try Self.make(special, at: dir.file("base"))
        let top = dir.file("top.qcow2")
        // -u: QEMU would hang opening the FIFO too.
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "base", "-F", "raw", top, "1M")
        for command in Self.commands where command != ["bitmap", "add", "IMG", "b"] {
            let arguments = command.map { $0 == "IMG" ? top : $0 == "OUT" ? dir.file("out") : $0 }
            Self.expectRefused(try Self.run(arguments), command.joined(separator: " "), kind: kind)
            #expect(!Self.wroteAnOutput(dir.file("out")), "\(command)")
        }
    }

    /// A repository whose latest layer was replaced by a FIFO: restore, verify and backup
    /// say so instead of hanging.
    @Test func asARepositoryLayer() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "1M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 3 0 64k"])
        let repo = dir.file("repo")
        #expect(try QBackupBinary.run(["backup", disk, "--repo", repo]).status == 0)
        let list = try JSONHelpers.parse(try QBackupBinary.run(["list", repo, "--output", "json"]).stdout) as? [String: Any]
        let layer = try #require(((list?["layers"] as? [[String: Any]])?.first)?["file"] as? String)
        try FileManager.default.removeItem(atPath: "\(repo)/\(layer)")
        #expect(mkfifo("\(repo)/\(layer)", 0o644) == 0)
        for command in [["restore", repo, "--to", dir.file("out")], ["verify", repo]] {
            let result = try Self.run(command)
            #expect(result.status != 0 && result.status < 124, "\(command): \(result.stderr)")
            #expect((result.stderr + result.stdout).contains("FIFO"), "\(command): \(result.stdout) \(result.stderr)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
    }
}
