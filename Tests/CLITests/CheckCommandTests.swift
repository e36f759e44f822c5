import Foundation
import Testing
import TestSupport

/// `qbackup check`'s human summary against `qemu-img check`'s on the same images.
@Suite struct CheckCommandTests {
    /// The lines after the findings: the cluster statistics and the image end offset.
    static func summary(_ text: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter {
            $0.contains("% allocated") || $0.hasPrefix("Image end offset") || $0.hasPrefix("No errors")
        }
    }

    /// Images QEMU wrote: empty, all compressed, mixed compressed and plain, fragmented (written
    /// backwards), and partly allocated.
    static let recipes: [(String, [String])] = [
        ("empty", []),
        ("compressed", ["write -c 0 128k", "write -c 128k 64k"]),
        ("mixed", ["write -c 0 128k", "write 256k 64k", "write -c 512k 64k"]),
        ("backwards", ["write 768k 64k", "write 512k 64k", "write 256k 64k", "write 0 64k"]),
        ("partial", ["write 0 200k", "write -z 300k 64k"]),
    ]

    @Test(arguments: recipes)
    func summaryMatchesQemuImg(name: String, writes: [String]) throws {
        let dir = TempDir()
        let path = dir.file("\(name).qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "1M")
        if !writes.isEmpty { try Tools.qemuIO(path, format: "qcow2", writes) }
        let theirs = try Tools.run("qemu-img", ["check", path])
        let ours = try QBackupBinary.run(["check", path])
        #expect(ours.status == theirs.status, "\(ours.stderr)")
        #expect(Self.summary(ours.stdout) == Self.summary(theirs.stdout), "\(name): qemu-img said\n\(theirs.stdout)")
        #expect(Self.summary(theirs.stdout).count >= 2, "\(theirs.stdout)")
    }
}
