import BitmapStore
import Foundation
import QCowImage
import Testing
import TestSupport

/// Our writes, QEMU's reading: after each add/clear/merge/enable/disable/remove
/// the image checks clean, qemu-img info lists the bitmaps with our flags and
/// granularity, and qemu-nbd exports exactly the extents we intended.
@Suite struct BitmapCatalogCommitTests {
    /// Runs `body` on a writable catalog of `image`, then closes it.
    func withCatalog(_ image: String, _ body: (BitmapCatalog) throws -> Void) throws {
        let file = try QemuOracle.open(image, writable: true)
        defer { file.close() }
        let catalog = try BitmapCatalog(file: file)
        try body(catalog)
        try catalog.close()
    }

    /// Fails unless QEMU sees exactly `expected` (name -> (granularity, flags, bitmap)).
    func expectQemuAgrees(_ image: String, _ expected: [String: (UInt64, [String], DirtyBitmap)], dir: TempDir,
                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        try QemuOracle.expectClean(image, sourceLocation: sourceLocation)
        let info = try QemuOracle.infoBitmaps(image)
        #expect(Set(info.keys) == Set(expected.keys), sourceLocation: sourceLocation)
        for (name, (granularity, flags, bitmap)) in expected {
            #expect(info[name]?.granularity == granularity, "granularity of \(name)", sourceLocation: sourceLocation)
            #expect(info[name]?.flags == flags, "flags of \(name)", sourceLocation: sourceLocation)
            let qemu = try QemuNBD.dirtyMap(image: image, bitmap: name, directory: dir)
            #expect(qemu == QemuOracle.ourMap(bitmap), "extents of \(name)", sourceLocation: sourceLocation)
        }
    }

    @Test(arguments: [512, 65536, 2 << 20])
    func addIsReadByQemuAndTracksItsWrites(clusterSize: Int) throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        let size: UInt64 = 40 << 20
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", image, String(size))
        try Tools.qemuIO(image, format: "qcow2", ["write -P 7 0 3M"])
        try withCatalog(image) { catalog in
            try catalog.add("default")
            try catalog.add("fine", granularity: 512)
            try catalog.add("coarse", granularity: 2 << 20, enabled: false)
            #expect(catalog.entry(named: "default")?.granularity == UInt64(min(max(clusterSize, 4096), 65536)))
        }
        func empty(_ g: Int) throws -> DirtyBitmap { try DirtyBitmap(virtualSize: size, granularityBits: g) }
        let defaultBits = min(max(clusterSize, 4096), 65536).trailingZeroBitCount
        try expectQemuAgrees(image, ["default": (1 << UInt64(defaultBits), ["auto"], try empty(defaultBits)),
                                     "fine": (512, ["auto"], try empty(9)), "coarse": (2 << 20, [], try empty(21))], dir: dir)
        // QEMU tracks writes in the bitmaps we made enabled, and only in those.
        let writes = QemuOracle.scatteredWrites(seed: 11, count: 12, size: size)
        try Tools.qemuIO(image, format: "qcow2", writes)
        let file = try QemuOracle.open(image)
        defer { file.close() }
        let catalog = try BitmapCatalog(file: file)
        #expect(try catalog.load("coarse").isEmpty)
        for name in ["default", "fine"] {
            let qemu = try QemuNBD.dirtyMap(image: image, bitmap: name, directory: dir)
            #expect(QemuOracle.ourMap(try catalog.load(name)) == qemu)
            #expect(qemu.contains { $0.dirty })
        }
    }

    @Test func clearMergeDisableEnableRemove() throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        let size: UInt64 = (24 << 20) + 4096
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, String(size))
        try QemuOracle.run([.add("a", granularity: 4096), .add("b", granularity: 65536), .add("c", granularity: 512),
                            .writes(seed: 21, count: 15)], on: image, size: size)
        var a = try DirtyBitmap(virtualSize: size, granularityBits: 12)
        var b = try DirtyBitmap(virtualSize: size, granularityBits: 16)
        var c = try DirtyBitmap(virtualSize: size, granularityBits: 9)
        try withCatalog(image) { catalog in
            a = try catalog.load("a")
            b = try catalog.load("b")
            c = try catalog.load("c")
            #expect(!a.isEmpty)
        }

        try withCatalog(image) { try $0.clear("a") }
        a.clearAll()
        try expectQemuAgrees(image, ["a": (4096, ["auto"], a), "b": (65536, ["auto"], b), "c": (512, ["auto"], c)], dir: dir)

        try withCatalog(image) { try $0.disable("b") }
        try expectQemuAgrees(image, ["a": (4096, ["auto"], a), "b": (65536, [], b), "c": (512, ["auto"], c)], dir: dir)

        // Write only to a and c now (b is disabled), then merge c (finer) into b and b (coarser) into a.
        try Tools.qemuIO(image, format: "qcow2", ["write -P 3 10000 5000", "write -z 20M 70000"])
        for r: Range<UInt64> in [10000..<15000, (20 << 20)..<((20 << 20) + 70000)] { a.set(r); c.set(r) }
        try withCatalog(image) { catalog in
            try catalog.merge(into: "b", sources: ["c"])
            try catalog.merge(into: "a", sources: ["b"])
        }
        try b.formUnion(c)
        try a.formUnion(b)
        try expectQemuAgrees(image, ["a": (4096, ["auto"], a), "b": (65536, [], b), "c": (512, ["auto"], c)], dir: dir)

        try withCatalog(image) { try $0.enable("b") }
        try Tools.qemuIO(image, format: "qcow2", ["write -P 9 1000 1"])
        for r: Range<UInt64> in [1000..<1001] { a.set(r); b.set(r); c.set(r) }
        try expectQemuAgrees(image, ["a": (4096, ["auto"], a), "b": (65536, ["auto"], b), "c": (512, ["auto"], c)], dir: dir)

        try withCatalog(image) { try $0.remove("b") }
        try expectQemuAgrees(image, ["a": (4096, ["auto"], a), "c": (512, ["auto"], c)], dir: dir)
        try withCatalog(image) { catalog in
            try catalog.remove("a")
            try catalog.remove("c")
            #expect(catalog.bitmapsExtension == nil)
        }
        try expectQemuAgrees(image, [:], dir: dir)
        let file = try QemuOracle.open(image)
        defer { file.close() }
        #expect(!file.header.autoclearFeatures.contains(.bitmaps))
        #expect(file.header.extensionData(HeaderExtension.bitmaps) == nil)
    }

    @Test func mergeFromAnotherImageOfAnyGranularity() throws {
        let dir = TempDir()
        let size: UInt64 = 16 << 20
        let (target, source) = (dir.file("t.qcow2"), dir.file("s.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", target, String(size))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", source, String(size))
        try QemuOracle.run([.add("t", granularity: 1 << 20), .writes(seed: 31, count: 4)], on: target, size: size)
        try QemuOracle.run([.add("s", granularity: 512), .writes(seed: 32, count: 6)], on: source, size: size)
        let sourceFile = try QemuOracle.open(source)
        defer { sourceFile.close() }
        let sourceBitmap = try BitmapCatalog(file: sourceFile).load("s")
        var expected = try DirtyBitmap(virtualSize: size, granularityBits: 20)
        try withCatalog(target) { catalog in
            expected = try catalog.load("t").union(sourceBitmap)
            try catalog.merge(into: "t", bitmaps: [sourceBitmap])
        }
        try expectQemuAgrees(target, ["t": (1 << 20, ["auto"], expected)], dir: dir)

        let other = dir.file("o.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", other, String(size * 2))
        try withCatalog(target) { catalog in
            let wrongSize = try DirtyBitmap(virtualSize: size * 2, granularityBits: 16)
            #expect(throws: BitmapError.self) { try catalog.merge(into: "t", bitmaps: [wrongSize]) }
        }
    }

    @Test func ourWritesMarkEnabledBitmapsAndClearInUseOnClose() throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        let size: UInt64 = 8 << 20
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, String(size))
        try QemuOracle.run([.add("on", granularity: 65536), .add("off", granularity: 512), .disable("off"),
                            .io(["write -P 1 0 4096"])], on: image, size: size)
        var expected = try DirtyBitmap(virtualSize: size, granularityBits: 16)
        expected.set(0..<4096)
        let file = try QemuOracle.open(image, writable: true)
        let catalog = try BitmapCatalog(file: file)
        try catalog.startTracking()
        // While tracking, the enabled bitmap is in_use on disk (QEMU sees it inconsistent).
        #expect(try QemuOracle.infoBitmaps(image)["on"]?.flags == ["in-use", "auto"])
        let data = [UInt8](repeating: 0xab, count: 3000)
        for (offset, kind) in [(100_000, 0), (3_000_000, 1), (7_000_000, 2)] {
            switch kind {
            case 0: try data.withUnsafeBytes { try file.write($0, at: UInt64(offset)) }
            case 1: try file.writeZeroes(at: UInt64(offset), length: 3000)
            default: try file.discard(at: UInt64(offset), length: 3000)
            }
            expected.set(UInt64(offset)..<UInt64(offset + 3000))
        }
        #expect(try catalog.load("on") == expected)
        try catalog.close()
        file.close()
        try expectQemuAgrees(image, ["on": (65536, ["auto"], expected),
                                     "off": (512, [], try DirtyBitmap(virtualSize: size, granularityBits: 9))], dir: dir)
    }

    @Test func inconsistentBitmapIsRefusedExceptListDumpRemove() throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, "4M")
        try QemuOracle.run([.add("x", granularity: 65536), .add("y", granularity: 65536)], on: image, size: 4 << 20)
        // Simulate a crash while tracking: leave x in_use on disk.
        do {
            let file = try QemuOracle.open(image, writable: true)
            let catalog = try BitmapCatalog(file: file)
            try catalog.startTracking()
            file.writeObserver = nil
            file.close()
        }
        try withCatalog(image) { catalog in
            let summary = try #require(try catalog.list().first { $0.name == "x" })
            #expect(summary.inUse && summary.inconsistency == .inUse && summary.dirtyBytes == nil)
            for op: (BitmapCatalog) throws -> Void in [{ try $0.clear("x") }, { try $0.disable("x") },
                                                      { try $0.merge(into: "x", sources: ["y"]) },
                                                      { try $0.merge(into: "y", sources: ["x"]) }] {
                let error = try #require(throws: BitmapError.self) { try op(catalog) }
                #expect(error.code == .refused)
                #expect(error.message.contains("in_use"))
            }
            #expect(try catalog.dump("x").warning != nil)
            try catalog.remove("x")
            try catalog.remove("y")
        }
        try QemuOracle.expectClean(image)
    }
}
