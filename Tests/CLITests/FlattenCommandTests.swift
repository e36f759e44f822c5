import Foundation
import Testing
import TestSupport

/// `qbackup flatten` against `qbackup restore` and qemu-img.
@Suite struct FlattenCommandTests {
    /// One point of a repository, flattened from its layer files and restored, in both
    /// formats: the same guest data (qemu-img compare) and the same layout (qemu-img map):
    /// both go through the same copier with the same zero policy. The point has zero
    /// clusters hiding older data and data clusters that read as zeros.
    @Test(arguments: ["qcow2", "raw"])
    func flattenAndRestoreOfAPointAgree(_ format: String) throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "8M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x11 0 3M", "write -P 0x22 5M 1M"])
        let full = try QBackupBinary.run(["backup", disk, "--repo", repo, "--bitmap", "nightly"])
        #expect(full.status == 0, "\(full.stderr)")
        try Tools.qemuIO(disk, format: "qcow2",
                         ["write -z 1M 256k", "write -P 0 2M 128k", "write -P 0x33 3M 70k", "write -P 0x44 7M 4096"])
        let inc = try QBackupBinary.run(["backup", disk, "--repo", repo])
        #expect(inc.status == 0, "\(inc.stderr)")
        let list = try JSONHelpers.parse(QBackupBinary.run(["list", repo, "--output", "json"]).stdout) as? [String: Any]
        let layers = list?["layers"] as? [[String: Any]] ?? []
        let top = try #require(layers.last?["file"] as? String)

        let flat = dir.file("flat.\(format)")
        let flatten = try QBackupBinary.run(["flatten", "\(repo)/\(top)", flat, "--format", format])
        #expect(flatten.status == 0, "\(flatten.stderr)")
        let restored = dir.file("restored.\(format)")
        let restore = try QBackupBinary.run(["restore", repo, "--to", restored, "--format", format])
        #expect(restore.status == 0, "\(restore.stderr)")

        try Tools.qemuImg("compare", "-q", "-f", format, "-F", "qcow2", flat, disk)
        try Tools.qemuImg("compare", "-q", "-f", format, "-F", format, flat, restored)
        let flatMap = try JSONHelpers.allocation(of: flat, format: format)
        #expect(flatMap == (try JSONHelpers.allocation(of: restored, format: format)))
        // Neither keeps data where the point reads zeros (zeroed, or written as zero bytes).
        #expect(!flatMap.isEmpty)
        if format == "qcow2" {
            for image in [flat, restored] { try Tools.qemuImg("check", "-q", image) }
            let map = try JSONHelpers.mergedMap(Tools.qemuImg("map", "--output=json", flat).stdout)
            let at1M = map.first { ($0["start"] as? Int ?? -1) <= 1 << 20 && 1 << 20 < ($0["start"] as? Int ?? 0) + ($0["length"] as? Int ?? 0) }
            #expect(at1M?["data"] as? Bool == false && at1M?["present"] as? Bool == false, "\(map)")
        }
    }
}
