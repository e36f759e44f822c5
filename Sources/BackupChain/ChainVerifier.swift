import BitmapStore
#if canImport(Glibc)
import Glibc
#endif
import Logging
import QCowImage

/// `verify`: every layer opens and checks clean, matches its checksum and the
/// manifest (backing link, virtual size); with an image, its tracking bitmap
/// covers every cluster where the image differs from the latest point.
public enum ChainVerifier {
    public struct Report: Sendable {
        public var layersChecked = 0
        /// Problems found, each naming the point and its layer file.
        public var problems: [Problem] = []
        /// Things to know that are not wrong with the repository (foreign files in its folder).
        public var warnings: [String] = []
        /// With an image: guest offsets (bitmap-granularity blocks) that differ from the
        /// latest point but are clean in the bitmap — the first ones found.
        public var missedOffsets: [UInt64] = []
        public var missedCount: UInt64 = 0
        public var imageChecked = false
        public var ok: Bool { problems.isEmpty && missedCount == 0 }
        public init() {}
    }

    /// One problem `verify` found: what kind, which point (its stable index) and layer file,
    /// where in that file when known, and what is wrong.
    public struct Problem: Sendable, CustomStringConvertible {
        public enum Kind: String, Sendable {
            case interruptedMerge = "interrupted-merge"
            /// Marked damaged in the manifest (found when a version 1 manifest was upgraded).
            case damaged
            /// The file's size or checksum is not what the manifest recorded.
            case checksum
            /// The backing file or its format is not the previous layer / qcow2.
            case backing
            case dataFile = "data-file"
            case virtualSize = "virtual-size"
            /// `check` found corruptions or leaks.
            case check
            /// The layer cannot be opened or read.
            case unreadable
        }

        public var kind: Kind
        public var layer: Int?
        public var file: String?
        public var offset: UInt64?
        public var message: String

        public init(_ kind: Kind, layer: Int? = nil, file: String? = nil, offset: UInt64? = nil, _ message: String) {
            self.kind = kind
            self.layer = layer
            self.file = file
            self.offset = offset
            self.message = message
        }

        /// "layer 3 (incr-….qcow2): message", as the human output lists it.
        public var description: String {
            guard let layer else { return message }
            return "layer \(layer) (\(file ?? "")): \(message)"
        }
    }

    public static let maxMissedListed = 20

    /// Verifies the repository at `repository`, waiting up to `wait` seconds for a backup or
    /// merge that holds its lock to finish. `lockImage` false opens `image` without QEMU's
    /// image lock (-U: a VM may hold it).
    public static func verify(repository: String, image: String? = nil, lockImage: Bool = true, wait: Double = 0,
                              logger: Logger = Logger(label: "qbackup.verify"),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Report {
        let repo = try BackupRepository(path: repository, exclusive: false, wait: wait)
        guard let manifest = repo.manifest else {
            throw ChainError(.invalidArgument, "the repository holds no backup", path: repository)
        }
        var report = Report()
        if manifest.pendingMerge != nil {
            report.problems.append(Problem(.interruptedMerge, "a merge was interrupted; run 'qbackup merge' to finish it"))
            return report
        }
        report.warnings += repo.foreignFiles().map {
            "\($0) is not a file of this repository (neither the manifest nor its journal names it): left alone"
        }
        verifyLayers(of: manifest, in: repo.path, report: &report)
        if let image {
            try verifyBitmap(repo, manifest, image: image, lock: lockImage, report: &report, progress: progress)
        }
        return report
    }

    /// Checks every layer file of `manifest` in `directory` on its own; the files come from `files`.
    public static func verifyLayers(of manifest: BackupManifest, in directory: String,
                                    files: FileOpener? = nil, report: inout Report) {
        let files = files ?? RepositoryFiles(directory: directory)
        for (i, layer) in manifest.layers.enumerated() {
            verifyLayer("\(directory)/\(layer.file)", manifest, i, layer, files, &report)
        }
    }

    static func verifyLayer(_ path: String, _ manifest: BackupManifest, _ i: Int,
                            _ layer: BackupManifest.Layer, _ files: FileOpener, _ report: inout Report) {
        func problem(_ kind: Problem.Kind, _ text: String, offset: UInt64? = nil) {
            report.problems.append(Problem(kind, layer: layer.index, file: layer.file, offset: offset, text))
        }
        report.layersChecked += 1
        do {
            let file = try ImageOpener.openQCow(path, files: files)
            defer { file.close() }
            if let damaged = layer.damaged { problem(.damaged, "damaged (found when the manifest was upgraded): \(damaged)") }
            if let mismatch = try LayerDigest.mismatch(file.device, layer: layer) {
                problem(.checksum, mismatch.message, offset: mismatch.offset)
            }
            let expectedBacking = layer.kind == .incremental && i > 0 ? manifest.layers[i - 1].file : nil
            if file.header.backingFile != expectedBacking {
                problem(.backing, "backing file is \(file.header.backingFile ?? "none"), the manifest says \(expectedBacking ?? "none")")
            }
            if expectedBacking != nil && file.header.backingFormat != "qcow2" {
                problem(.backing, "backing format is \(file.header.backingFormat ?? "unset"), expected qcow2")
            }
            if file.header.incompatibleFeatures.contains(.externalDataFile) {
                problem(.dataFile, "names an external data file; a layer keeps its data in itself")
            }
            if file.virtualSize != layer.virtualSize {
                problem(.virtualSize, "virtual size is \(file.virtualSize), the manifest says \(layer.virtualSize)")
            }
            let check = try QCowChecker.check(file)
            if check.corruptions > 0 || check.leaks > 0 || check.checkErrors > 0 {
                let finding = check.findings.first
                let first = finding.map { ": \($0.region) at 0x\(String($0.offset ?? 0, radix: 16)): \($0.message)" } ?? ""
                problem(.check, "check found \(check.corruptions) corruption(s), \(check.leaks) leak(s)\(first)",
                        offset: finding?.offset)
            }
        } catch let error as QCowError {
            problem(.unreadable, error.description, offset: error.offset)
        } catch let error as BitmapError {
            problem(.unreadable, error.description, offset: error.offset)
        } catch let error as CodedError {
            problem(.unreadable, error.description)
        } catch {
            problem(.unreadable, "\(error)")
        }
    }

    /// Every bitmap-granularity block where the image differs from the latest point must be dirty.
    static func verifyBitmap(_ repo: BackupRepository, _ manifest: BackupManifest, image path: String, lock: Bool = true,
                             report: inout Report, progress: ((UInt64, UInt64) -> Void)?) throws {
        let image = try ImageOpener.open(path, lock: lock)
        defer { image.close() }
        guard let file = image as? QCowFile else {
            throw ChainError(.invalidArgument, "\(path) is not a qcow2 image; it has no bitmaps")
        }
        // A damaged image is still compared (DESIGN "Damaged images": read-only work goes on), with one warning.
        if let line = BitmapCatalog.damageWarning(for: file) { report.warnings.append(line) }
        // A 0-byte disk holds no bitmap (QEMU cannot store one) and nothing a bitmap could miss.
        guard image.virtualSize > 0 else {
            report.imageChecked = true
            return
        }
        guard let name = manifest.bitmap else {
            throw ChainError(.invalidArgument, "the repository tracks changes without a bitmap; --image has nothing to check",
                             path: repo.path)
        }
        let catalog = try BitmapCatalog(file: file)
        let bitmap = try catalog.load(name)
        let latest = try RestoreEngine.openPoint(repo.path, manifest, index: manifest.layers.count - 1)
        defer { latest.close() }
        report.imageChecked = true
        let granularity = bitmap.granularity
        let size = image.virtualSize
        let chunk = UInt64(max(4 << 20, Int(granularity)))
        var a = [UInt8](repeating: 0, count: Int(chunk))
        var b = [UInt8](repeating: 0, count: Int(chunk))
        var offset: UInt64 = 0
        while offset < size {
            var n = Int(min(chunk, size - offset))
            // Ranges that read as zeros on both sides need no reading at all.
            let mine = try image.blockStatus(at: offset, maxLength: UInt64(n))
            let theirs: BlockStatus? = offset < latest.virtualSize
                ? try latest.blockStatus(at: offset, maxLength: mine.length) : nil
            n = Int(theirs.map { min($0.length, mine.length) } ?? mine.length)
            if mine.kind != .data && (theirs == nil || theirs?.kind != .data) {
                offset += UInt64(n)
                progress?(offset, size)
                continue
            }
            try a.withUnsafeMutableBytes { try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
            try b.withUnsafeMutableBytes { try latest.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
            let differs = a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in memcmp(pa.baseAddress!, pb.baseAddress!, n) != 0 } }
            if differs {
                // Find the differing blocks of the bitmap's granularity.
                let g = Int(granularity)
                var block = -Int(offset % granularity)
                while block < n {
                    let start = max(block, 0)
                    let end = min(n, block + g)
                    let same = a.withUnsafeBytes { pa in
                        b.withUnsafeBytes { pb in memcmp(pa.baseAddress! + start, pb.baseAddress! + start, end - start) == 0 }
                    }
                    if !same {
                        let at = offset + UInt64(start)
                        if !bitmap.isDirty(at: at) {
                            report.missedCount += 1
                            if report.missedOffsets.count < maxMissedListed { report.missedOffsets.append(at) }
                        }
                    }
                    block += g
                }
            }
            offset += UInt64(n)
            progress?(offset, size)
        }
    }
}
