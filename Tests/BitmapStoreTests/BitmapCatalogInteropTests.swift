import BitmapStore
import Foundation
import QCowImage
import Testing
import TestSupport

/// Images and bitmaps made and dirtied by QEMU, read by us: every bitmap's
/// extents equal what qemu-nbd exports, and list/info agree with qemu-img.
@Suite struct BitmapCatalogInteropTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        var name: String
        var size: UInt64
        var clusterSize: Int = 65536
        var steps: [QemuOracle.Step]
        var testDescription: String { name }
    }

    static let variants: [Variant] = [
        Variant(name: "one bitmap, 64 KiB", size: 64 << 20,
                steps: [.add("b0", granularity: nil), .writes(seed: 1, count: 25)]),
        Variant(name: "512 B granularity, 512 B clusters, odd size", size: (8 << 20) + 12345, clusterSize: 512,
                steps: [.add("fine", granularity: 512), .writes(seed: 2, count: 30)]),
        Variant(name: "2 MiB granularity", size: 300 << 20, clusterSize: 2 << 20,
                steps: [.add("coarse", granularity: 2 << 20), .writes(seed: 3, count: 20)]),
        Variant(name: "three bitmaps, enabled, disabled, merged", size: 48 << 20,
                steps: [.add("a", granularity: 512), .add("b", granularity: 65536), .writes(seed: 4, count: 10),
                        .disable("b"), .add("c", granularity: 1 << 20), .writes(seed: 5, count: 10),
                        .merge(source: "b", into: "c"), .writes(seed: 6, count: 5)]),
        Variant(name: "cleared and re-enabled", size: 16 << 20,
                steps: [.add("x", granularity: 4096), .writes(seed: 7, count: 10), .disable("x"),
                        .writes(seed: 8, count: 5), .clear("x"), .enable("x"), .writes(seed: 9, count: 8)]),
        Variant(name: "whole disk dirty across many data clusters", size: 40 << 20, clusterSize: 512,
                steps: [.add("all", granularity: 512), .io(["write -P 1 0 40M"])]),
    ]

    @Test(arguments: variants)
    func dumpEqualsQemuNbdMap(_ variant: Variant) throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(variant.clusterSize)", image, String(variant.size))
        try QemuOracle.run(variant.steps, on: image, size: variant.size)
        let info = try QemuOracle.infoBitmaps(image)
        let file = try QemuOracle.open(image)
        defer { file.close() }
        let catalog = try BitmapCatalog(file: file)
        #expect(catalog.autoclearBitSet)
        #expect(Set(catalog.entries.map(\.name)) == Set(info.keys))
        for summary in try catalog.list() {
            let expected = try #require(info[summary.name])
            #expect(summary.granularity == expected.granularity)
            #expect(summary.enabled == expected.flags.contains("auto"))
            #expect(!summary.inUse)
            let dump = try catalog.dump(summary.name)
            #expect(dump.warning == nil)
            let qemu = try QemuNBD.dirtyMap(image: image, bitmap: summary.name, directory: dir)
            #expect(QemuOracle.ourMap(dump.bitmap) == qemu, "bitmap \(summary.name)")
            #expect(summary.dirtyBytes == qemu.filter(\.dirty).reduce(0) { $0 + $1.length })
        }
        #expect(catalog.info().map(\.name) == catalog.entries.map(\.name))
        for item in catalog.info() { #expect(item.flags == info[item.name]?.flags) }
    }

    @Test func hundredBitmaps() throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        let size: UInt64 = 32 << 20
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, String(size))
        for i in 0..<100 {
            try Tools.qemuImg("bitmap", "--add", "-g", String(512 << (i % 8)), image, "bitmap-\(i)")
            if i % 10 == 0 { try QemuOracle.run([.writes(seed: UInt64(100 + i), count: 3)], on: image, size: size) }
            if i % 3 == 0 { try Tools.qemuImg("bitmap", "--disable", image, "bitmap-\(i)") }
        }
        let info = try QemuOracle.infoBitmaps(image)
        let file = try QemuOracle.open(image)
        defer { file.close() }
        let catalog = try BitmapCatalog(file: file)
        #expect(catalog.entries.count == 100)
        #expect(catalog.entries.map(\.name) == (0..<100).map { "bitmap-\($0)" })
        for item in catalog.info() {
            #expect(item.granularity == info[item.name]?.granularity)
            #expect(item.flags == info[item.name]?.flags)
        }
        for entry in catalog.entries {
            let qemu = try QemuNBD.dirtyMap(image: image, bitmap: entry.name, directory: dir)
            #expect(QemuOracle.ourMap(try catalog.load(entry.name)) == qemu, "bitmap \(entry.name)")
        }
    }

    @Test func imageWithoutBitmaps() throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, "1M")
        let file = try QemuOracle.open(image)
        defer { file.close() }
        let catalog = try BitmapCatalog(file: file)
        #expect(catalog.bitmapsExtension == nil)
        #expect(catalog.entries.isEmpty)
        #expect(try catalog.list().isEmpty)
        #expect(try BitmapCatalog.info(for: file).isEmpty)
    }
}
