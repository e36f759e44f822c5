import Foundation
import QCowImage
import Testing
import TestSupport

/// Writes to an image with internal snapshots (made by qemu-img) copy shared
/// L2 tables and clusters: every snapshot still reads as before
/// (`qemu-img convert -l`), the active layer reads as the model, and
/// `qemu-img check` (which verifies the COPIED flags) is clean.
@Suite struct SnapshotWriteTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        var options: String
        var seed: UInt64
        var testDescription: String { options }
    }

    static let variants = [
        Variant(options: "cluster_size=65536", seed: 7),
        Variant(options: "cluster_size=4096,refcount_bits=8", seed: 8),
        Variant(options: "cluster_size=65536,extended_l2=on", seed: 9),
        Variant(options: "cluster_size=512,refcount_bits=64", seed: 10),
        Variant(options: "compat=0.10,cluster_size=4096", seed: 11),
    ]

    @Test(arguments: variants)
    func snapshotsSurviveOurWrites(_ v: Variant) throws {
        let dir = TempDir()
        let path = dir.file("snap.qcow2")
        let size: UInt64 = 2 << 20
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", v.options, path, "\(size)")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x11 0 1M", "write -P 0x12 1536k 200k"])
        try Tools.qemuImg("snapshot", "-c", "one", path)
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x21 512k 1M", "write -z 0 64k"])
        try Tools.qemuImg("snapshot", "-c", "two", path)
        try Tools.qemuImg("convert", "-O", "raw", "-l", "one", path, dir.file("one.raw"))
        try Tools.qemuImg("convert", "-O", "raw", "-l", "two", path, dir.file("two.raw"))
        try Tools.qemuImg("convert", "-O", "raw", path, dir.file("active.raw"))
        var model = [UInt8](try Data.contents(of: dir.file("active.raw")))

        let image = try #require(try openWritableRetryingLock(path) as? QCowFile)
        var rng = SeededRandom(seed: v.seed)
        let cs = UInt64(image.clusterSize)
        for step in 0..<30 {
            let offset = UInt64.random(in: 0..<size, using: &rng)
            let length = min(size - offset, UInt64.random(in: 1...(256 << 10), using: &rng))
            switch step % 5 {
            case 0, 1, 2:
                let byte = UInt8(truncatingIfNeeded: step + 0x40)
                let data = [UInt8](repeating: byte, count: Int(length))
                try data.withUnsafeBytes { try image.write($0, at: offset) }
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: data)
            case 3:
                try image.writeZeroes(at: offset, length: length)
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
            default:
                let cluster = offset / cs * cs
                let data = [UInt8](repeating: UInt8(step), count: Int(min(cs, size - cluster)))
                try data.withUnsafeBytes { try image.writeCompressed(cluster: $0, at: cluster) }
                model.replaceSubrange(Int(cluster)..<(Int(cluster) + data.count), with: data)
            }
        }
        try image.flush()
        image.close()

        try Tools.qemuImg("check", "-f", "qcow2", path)
        for name in ["one", "two"] {
            try Tools.qemuImg("convert", "-O", "raw", "-l", name, path, dir.file("\(name)-after.raw"))
            #expect(try Data.contents(of: dir.file("\(name)-after.raw")) == Data.contents(of: dir.file("\(name).raw")),
                    "snapshot \(name) changed")
        }
        try Data(model).write(to: URL(fileURLWithPath: dir.file("model.raw")))
        try Tools.qemuImg("compare", "-q", "-f", "qcow2", "-F", "raw", path, dir.file("model.raw"))
    }
}
