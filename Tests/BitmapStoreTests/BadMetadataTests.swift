import BitmapStore
import Foundation
import QCowImage
import Testing
import TestSupport

/// Damaged bitmap metadata, poked at named spec offsets: a clear error naming
/// code, offset and region; nothing written; the check reports it; repair drops
/// what is broken so QEMU can open the image again.
@Suite struct BadMetadataTests {
    struct Layout {
        var extensionData: UInt64
        var directory: UInt64
        var entry0: UInt64
        var entry1: UInt64
        var fileSize: UInt64
    }

    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        var poke: @Sendable (String, Layout) throws -> Void
        var code: QCowError.Code
        var region: String
        /// The expected error offset, nil when only the region is fixed.
        var offset: (@Sendable (Layout) -> UInt64)?
        /// Whether repair can keep the directory (drop just the broken bitmap).
        var perBitmap: Bool
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "nb_bitmaps 0", poke: { try poke($0, at: $1.extensionData, be(UInt32(0))) },
             code: .corrupt, region: "bitmaps extension", offset: { $0.extensionData }, perBitmap: false),
        Case(name: "unaligned directory", poke: { try poke($0, at: $1.extensionData + 16, be($1.directory + 8)) },
             code: .corrupt, region: "bitmaps extension", offset: { $0.extensionData + 16 }, perBitmap: false),
        Case(name: "directory larger than the file", poke: { try poke($0, at: $1.extensionData + 8, be(UInt64(60 << 20))) },
             code: .truncated, region: "bitmaps extension", offset: { $0.extensionData + 16 }, perBitmap: false),
        Case(name: "name_size 0", poke: { try poke($0, at: $1.entry0 + 18, be(UInt16(0))) },
             code: .corrupt, region: "bitmap directory", offset: nil, perBitmap: false),
        Case(name: "duplicate names", poke: { try poke($0, at: $1.entry1 + 24, Array("a".utf8)) },
             code: .corrupt, region: "bitmap directory", offset: { $0.entry1 }, perBitmap: true),
        Case(name: "granularity_bits 70", poke: { try poke($0, at: $1.entry0 + 17, [70]) },
             code: .unsupported, region: "bitmap directory", offset: { $0.entry0 + 17 }, perBitmap: true),
        Case(name: "reserved flag bits", poke: { try poke($0, at: $1.entry0 + 12, be(UInt32(0x8000_0002))) },
             code: .corrupt, region: "bitmap directory", offset: { $0.entry0 + 12 }, perBitmap: true),
        Case(name: "table past end of file", poke: { try poke($0, at: $1.entry0, be(($1.fileSize + (1 << 20)) & ~0xffff)) },
             code: .truncated, region: "bitmap directory", offset: { $0.entry0 }, perBitmap: true),
        Case(name: "wrong table size", poke: { try poke($0, at: $1.entry0 + 8, be(UInt32(2))) },
             code: .corrupt, region: "bitmap directory", offset: { $0.entry0 + 8 }, perBitmap: true),
    ]

    /// An image with bitmaps "a" and "b" and the offsets of its bitmap structures.
    static func makeImage(_ dir: TempDir) throws -> (String, Layout) {
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", image, "4M")
        try QemuOracle.run([.add("a", granularity: 65536), .add("b", granularity: 65536), .writes(seed: 71, count: 3)],
                           on: image, size: 4 << 20)
        let bytes = try Data.contents(of: image)
        let head = Array(bytes.prefix(65536))
        // Walk the header extensions from header_length to the bitmaps extension.
        var pos = Int(UInt32(head[100]) << 24 | UInt32(head[101]) << 16 | UInt32(head[102]) << 8 | UInt32(head[103]))
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(head[at + $1]) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(head[at + $1]) } }
        while u32(pos) != HeaderExtension.bitmaps {
            pos += 8 + ((Int(u32(pos + 4)) + 7) & ~7)
        }
        let data = UInt64(pos + 8)
        let directory = u64(pos + 8 + 16)
        return (image, Layout(extensionData: data, directory: directory, entry0: directory, entry1: directory + 32,
                              fileSize: UInt64(bytes.count)))
    }

    @Test(arguments: cases)
    func clearErrorNothingWrittenRepairable(_ damage: Case) throws {
        let dir = TempDir()
        let (image, layout) = try Self.makeImage(dir)
        try damage.poke(image, layout)
        let damaged = try Data.contents(of: image)

        let error = try #require(throws: BitmapError.self) {
            try BitmapCatalog.withCatalog(image, writable: true) { try $0.add("z") }
        }
        #expect(error.code == damage.code, "\(error)")
        #expect(error.region == damage.region, "\(error)")
        if let offset = damage.offset { #expect(error.offset == offset(layout), "\(error)") }
        #expect(error.path == image)
        #expect(try Data.contents(of: image) == damaged, "nothing may be written")

        // The check reports it and names the same place; repair drops what is broken.
        let file = try QemuOracle.open(image, writable: true)
        let report = try BitmapCatalog.check(file)
        #expect(report.findings.contains { $0.severity == .error && $0.region == damage.region })
        let result = try BitmapCatalog.repair(file)
        if damage.perBitmap {
            #expect(!result.dropped.isEmpty && !result.droppedExtension)
        } else {
            #expect(result.droppedExtension)
        }
        file.close()
        let check = try Tools.run("qemu-img", ["check", image])
        #expect(check.status == 0 || check.status == 3, "after repair: \(check.stdout) \(check.stderr)")
        let reopened = try QemuOracle.open(image)
        defer { reopened.close() }
        let catalog = try BitmapCatalog(file: reopened)
        #expect(try BitmapCatalog.check(reopened).findings.filter { $0.severity == .error }.isEmpty)
        if damage.perBitmap { #expect(catalog.entries.count == 1) }
    }

    @Test func healthyImageChecksCleanAndOwnsItsClusters() throws {
        let dir = TempDir()
        let (image, layout) = try Self.makeImage(dir)
        let file = try QemuOracle.open(image)
        defer { file.close() }
        let report = try BitmapCatalog.check(file)
        #expect(report.findings.isEmpty)
        #expect(report.ownedClusters.first == BitmapClusters(offset: layout.directory, count: 1, what: "bitmap directory"))
        #expect(report.ownedClusters.contains { $0.what == "bitmap table 'a'" })
        #expect(report.ownedClusters.contains { $0.what == "bitmap data 'a'" })
        #expect(try BitmapCatalog.ownedClusters(of: file) == report.ownedClusters)
    }
}
