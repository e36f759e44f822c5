import Foundation
import Testing
import TestSupport

/// A libvirt-backup scenario: a paused TCG domain (real libvirtd) with qcow2 disks, a model
/// of each disk's guest-visible bytes kept alongside every write, the repository, and the
/// point each layer should restore to.
final class LibvirtScenario {
    let libvirt: LibvirtDaemon
    let dir: TempDir
    let domain: String
    let targets: [String]
    let size: Int
    /// The repository (one disk), or the folder of one repository per disk.
    let repo: String
    /// What the guest sees now, per disk target.
    var model: [String: [UInt8]] = [:]
    /// Each layer's point in time, per disk target, by layer index.
    var points: [String: [Int: [UInt8]]] = [:]
    var running = false
    /// The URI qbackup connects with (default: the daemon's own).
    var connect: String?
    /// The last backup's stderr.
    var stderr = ""
    private var defined = false

    init(_ libvirt: LibvirtDaemon, _ name: String, targets: [String] = ["vda"], size: Int = 8 << 20) throws {
        self.libvirt = libvirt
        dir = TempDir(name)
        domain = "qbackup-\(name)-\(UUID().uuidString.prefix(6))"
        self.targets = targets
        self.size = size
        repo = dir.file("repo")
        for target in targets {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", disk(target), "\(size)")
            model[target] = [UInt8](repeating: 0, count: size)
        }
    }

    deinit { libvirt.remove(domain) }

    func disk(_ target: String) -> String { dir.file("\(target).qcow2") }

    func start() throws {
        if defined {
            try libvirt.must(["start", domain, "--paused"])
        } else {
            try libvirt.startPausedDomain(domain, disks: targets.map { ($0, disk($0)) })
            defined = true
        }
        running = true
    }

    func destroy() throws {
        try libvirt.must(["destroy", domain])
        running = false
        for target in targets { waitForImageLocksToClear(disk(target)) }
    }

    /// A guest write: through HMP while the domain runs, with qemu-io on the file otherwise.
    func write(_ pattern: UInt8, at offset: Int, length: Int, disk target: String = "vda") throws {
        if running {
            try libvirt.write(domain, disk: targets.firstIndex(of: target) ?? 0, pattern, at: offset, length: length)
        } else {
            try Tools.qemuIO(disk(target), format: "qcow2", ["write -P \(pattern) \(offset) \(length)"])
        }
        for i in offset..<(offset + length) { model[target]?[i] = pattern }
    }

    func repository(_ target: String) -> String { targets.count == 1 ? repo : "\(repo)/\(target)" }

    /// `qbackup backup --libvirt` (JSON), with `during` run while the job's export is up;
    /// records each disk's model from before `during` as the new layer's point.
    @discardableResult
    func backup(_ extra: [String] = [], expectStatus: Int32 = 0, during: (() throws -> Void)? = nil,
                sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
        let before = model
        let arguments = ["backup", "--libvirt", domain, "--connect", connect ?? libvirt.uri, "--repo", repo, "--output", "json"] + extra
        let result: Tools.Result
        if let during {
            let run = try RunningQBackup(arguments, held: true, directory: dir)
            // Without a job, the run's own status and stderr (below) say why.
            if waitForJob(while: run) {
                try during()
                #expect(try hasJob(), "the writes came after the backup job; the test proves nothing",
                        sourceLocation: sourceLocation)
            } else {
                Issue.record("the backup job never appeared", sourceLocation: sourceLocation)
            }
            result = run.wait()
        } else {
            result = try QBackupBinary.run(arguments)
        }
        stderr = result.stderr
        #expect(result.status == expectStatus, "qbackup backup: \(result.stderr)", sourceLocation: sourceLocation)
        let json = (try? JSONHelpers.parse(result.stdout) as? [String: Any]) ?? [:]
        if result.status == 0 { record(json, before: before) }
        return json
    }

    /// Records the layers a backup's JSON names as points of `before`: one disk's object, or
    /// several disks' (`{"disks": [{"disk": …, "index": …}, …]}`).
    func record(_ json: [String: Any], before: [String: [UInt8]]) {
        guard json["dry-run"] as? Bool != true else { return }
        if let index = json["index"] as? Int {
            for target in targets { points[target, default: [:]][index] = before[target] }
        }
        for disk in json["disks"] as? [[String: Any]] ?? [] {
            if let target = disk["disk"] as? String, let index = disk["index"] as? Int, disk["dry-run"] as? Bool != true {
                points[target, default: [:]][index] = before[target]
            }
        }
    }

    /// Several disks' JSON by disk target.
    func byDisk(_ json: [String: Any]) -> [String: [String: Any]] {
        var result: [String: [String: Any]] = [:]
        for disk in json["disks"] as? [[String: Any]] ?? [] {
            if let target = disk["disk"] as? String { result[target] = disk }
        }
        return result
    }

    func hasJob() throws -> Bool {
        try libvirt.virsh(["domjobinfo", domain]).stdout.contains("Backup")
    }

    /// Waits until the domain runs a backup job (or the process ended).
    func waitForJob(while run: RunningQBackup) -> Bool {
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline && run.isRunning {
            if (try? hasJob()) == true { return true }
            usleep(20_000)
        }
        return false
    }

    /// Every recorded point of every disk restores to its model, byte for byte.
    func checkEveryPoint(sourceLocation: SourceLocation = #_sourceLocation) throws {
        for target in targets {
            for (index, expected) in (points[target] ?? [:]).sorted(by: { $0.key < $1.key }) {
                let out = dir.file("restored-\(target)-\(index).raw")
                let restored = try QBackupBinary.run(["restore", repository(target), "--to", out, "--at", "\(index)",
                                                      "--format", "raw"])
                #expect(restored.status == 0, "restore \(target) --at \(index): \(restored.stderr)",
                        sourceLocation: sourceLocation)
                let bytes = try Data.contents(of: out)
                if bytes != Data(expected) {
                    let first = bytes.count != expected.count ? min(bytes.count, expected.count)
                        : (0..<bytes.count).first { bytes[$0] != expected[$0] } ?? 0
                    Issue.record("\(target) point \(index) differs from the model at offset \(first)",
                                 sourceLocation: sourceLocation)
                }
                try? FileManager.default.removeItem(atPath: out)
            }
        }
    }

    /// The repository's layers as `list --output json` reports them.
    func layers(_ target: String = "vda") throws -> [[String: Any]] {
        let listed = try QBackupBinary.run(["list", repository(target), "--output", "json"])
        let json = try JSONHelpers.parse(listed.stdout) as? [String: Any] ?? [:]
        return json["layers"] as? [[String: Any]] ?? []
    }

    /// No job on the domain and nothing of qbackup's left beside the disks.
    func checkNothingLeft(sourceLocation: SourceLocation = #_sourceLocation) throws {
        if running { #expect(try !hasJob(), "a backup job was left", sourceLocation: sourceLocation) }
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        #expect(!files.contains { $0.hasPrefix(".qbackup-") }, "\(files)", sourceLocation: sourceLocation)
    }
}
