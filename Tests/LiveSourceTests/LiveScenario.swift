import Foundation
import Testing
import TestSupport

/// A live-backup scenario: a qcow2 disk, a model of its guest-visible bytes kept
/// alongside every write, the repository, and the points each backup should restore to.
final class LiveScenario {
    let dir: TempDir
    let disk: String
    let repo: String
    let size: Int
    /// What the guest sees now.
    var model: [UInt8]
    /// The model at each recorded layer's point in time, by layer index.
    var points: [Int: [UInt8]] = [:]
    var vm: QemuVM?

    init(_ name: String, size: Int = 16 << 20) throws {
        dir = TempDir(name)
        disk = dir.file("disk.qcow2")
        repo = dir.file("repo")
        self.size = size
        model = [UInt8](repeating: 0, count: size)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "\(size)")
    }

    deinit { vm?.stop() }

    func startVM() throws {
        vm = try QemuVM(disk: disk, directory: dir)
    }

    /// Quits QEMU cleanly (its persistent bitmaps are written to the file).
    func quitVM() {
        vm?.quit()
        vm = nil
        waitForImageLocksToClear(disk)
    }

    /// A guest write through the running VM, or with qemu-io on the file when none runs.
    func write(_ pattern: UInt8, at offset: Int, length: Int) throws {
        if let vm {
            try vm.write(pattern, at: UInt64(offset), length: UInt64(length))
        } else {
            try Tools.qemuIO(disk, format: "qcow2", ["write -P \(pattern) \(offset) \(length)"])
        }
        for i in offset..<(offset + length) { model[i] = pattern }
    }

    /// `qbackup backup --qmp` (or offline on the file when no VM runs), JSON parsed; records
    /// the model as the new layer's point on success.
    @discardableResult
    func backup(_ extra: [String] = [], expectStatus: Int32 = 0, environment: [String: String] = [:],
                sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
        let target = vm.map { ["--qmp", $0.qmpSocket] } ?? [disk]
        let before = model
        let result = try QBackupBinary.run(["backup"] + target + ["--repo", repo, "--output", "json"] + extra,
                                           environment: environment)
        #expect(result.status == expectStatus, "qbackup backup: \(result.stderr)", sourceLocation: sourceLocation)
        let json = (try? JSONHelpers.parse(result.stdout) as? [String: Any]) ?? [:]
        if result.status == 0, let index = json["index"] as? Int, json["dry-run"] as? Bool != true {
            points[index] = before
        }
        return json
    }

    /// Every recorded point restores to its model, byte for byte.
    func checkEveryPoint(sourceLocation: SourceLocation = #_sourceLocation) throws {
        for (index, expected) in points.sorted(by: { $0.key < $1.key }) {
            let out = dir.file("restored-\(index).raw")
            let restored = try QBackupBinary.run(["restore", repo, "--to", out, "--at", "\(index)", "--format", "raw"])
            #expect(restored.status == 0, "restore --at \(index): \(restored.stderr)", sourceLocation: sourceLocation)
            let bytes = try Data.contents(of: out)
            let model = Data(expected)
            // Compared with memcmp, not in #expect: rendering two 16 MiB operands takes minutes,
            // and a byte loop in a debug build most of one.
            if bytes != model {
                let first = bytes.count != model.count ? min(bytes.count, model.count)
                    : (0..<bytes.count).first { bytes[$0] != model[$0] } ?? 0
                Issue.record("point \(index) differs from the model at offset \(first) (\(bytes.count) vs \(model.count) bytes)",
                             sourceLocation: sourceLocation)
            }
            try? FileManager.default.removeItem(atPath: out)
        }
    }

    /// Nothing of qbackup's left in QEMU: no export, no job, no fleecing node; no overlay file.
    func checkNothingLeft(sourceLocation: SourceLocation = #_sourceLocation) throws {
        if let vm {
            let left = try vm.leftovers()
            #expect(left.exports == 0 && left.jobs == 0, "\(left)", sourceLocation: sourceLocation)
            #expect(!left.nodes.contains { $0.hasPrefix("qb-") }, "\(left.nodes)", sourceLocation: sourceLocation)
        }
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        #expect(!files.contains { $0.hasPrefix(".qbackup-fleece-") || $0.hasPrefix(".qbackup-nbd-") }, "\(files)",
                sourceLocation: sourceLocation)
    }
}

/// Each layer's mode as `qbackup list --output json` reports it, in index order.
func layerModes(_ repo: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> [String] {
    let listed = try QBackupBinary.run(["list", repo, "--output", "json"])
    #expect(listed.status == 0, "list: \(listed.stderr)", sourceLocation: sourceLocation)
    let json = try JSONHelpers.parse(listed.stdout) as? [String: Any] ?? [:]
    return (json["layers"] as? [[String: Any]] ?? []).map { $0["mode"] as? String ?? "?" }
}
