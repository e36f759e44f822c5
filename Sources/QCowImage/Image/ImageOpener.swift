#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Logging

/// Opens images by path: probes the format, opens the backing chain with
/// names resolved as QEMU does, and refuses loops and absurd depths.
public enum ImageOpener {
    /// Deeper chains than this are refused as a likely loop or mistake.
    public static let maxChainDepth = 256

    /// The formats an image may be opened as.
    public enum Format: String, Sendable, CaseIterable { case qcow2, raw }

    /// Opens `path` and its whole backing chain. With `format` nil, the format is probed.
    /// `files` supplies the image and the files it names (the file system unless told).
    public static func open(_ path: String, format: Format? = nil, writable: Bool = false,
                            lock: Bool = true, files: FileOpener = LocalFiles()) throws -> GuestImage {
        var seen: Set<String> = []
        return try open(path, format: format, writable: writable, lock: lock, files: files, depth: 0, seen: &seen)
    }

    static func open(_ path: String, format: Format?, writable: Bool, lock: Bool, files: FileOpener, depth: Int,
                     seen: inout Set<String>) throws -> GuestImage {
        guard depth <= maxChainDepth else {
            throw QCowError(.invalidFormat, "backing chain is deeper than \(maxChainDepth) images", path: path,
                            region: "backing chain")
        }
        let real = files.canonicalPath(path) ?? path
        guard !seen.contains(real) else {
            throw QCowError(.invalidFormat, "backing chain loops back to this image", path: path, region: "backing chain")
        }
        seen.insert(real)
        let device = try files.open(path, writable: writable, lock: lock)
        let chosen: Format
        do {
            let detected = try probe(device)
            chosen = format ?? detected
            if chosen == .qcow2 && detected != .qcow2 { throw notQCow2(path) }
        } catch {
            (device as? FileDevice)?.close()
            throw error
        }
        switch chosen {
        case .raw:
            return try RawImage(device: device)
        case .qcow2:
            let image = try openQCow(on: device, path: path, writable: writable, files: files)
            do {
                if let backing = try openBacking(of: image, path: path, writable: false, lock: lock, files: files,
                                                 depth: depth + 1, seen: &seen) {
                    image.attachBacking(backing)
                }
            } catch {
                image.close()
                throw error
            }
            return image
        }
    }

    // MARK: - The one opener of a single image file

    /// Opens the one qcow2 image file at `path`: the file (locked when `lock`), its
    /// external data file if it names one, header, L1 and snapshot table — not its
    /// backing chain (`open` adds that). Every command and test that needs one
    /// qcow2 file, rather than a chain, opens it here. `forCheck` is for `check`
    /// (see `QCowFile.init`).
    public static func openQCow(_ path: String, writable: Bool = false, lock: Bool = true, forCheck: Bool = false,
                                files: FileOpener = LocalFiles(),
                                logger: Logger = Logger(label: "qbackup.qcow", factory: { _ in SwiftLogNoOpLogHandler() }))
        throws -> QCowFile
    {
        let device = try files.open(path, writable: writable, lock: lock)
        do {
            guard try probe(device) == .qcow2 else { throw notQCow2(path) }
        } catch {
            (device as? FileDevice)?.close()
            throw error
        }
        return try openQCow(on: device, path: path, writable: writable, forCheck: forCheck, files: files, logger: logger)
    }

    /// The qcow2 image on the already opened `device` (closed again if this throws), with
    /// the external data file it names, found relative to `path` through `files` (tests
    /// and fuzz targets pass their memory devices and `MemoryFiles` here).
    public static func openQCow(on device: BlockDevice, path: String? = nil, writable: Bool = false,
                                forCheck: Bool = false, files: FileOpener = LocalFiles(),
                                logger: Logger = Logger(label: "qbackup.qcow", factory: { _ in SwiftLogNoOpLogHandler() }))
        throws -> QCowFile
    {
        let path = path ?? device.name
        var external: BlockDevice?
        do {
            // A repair rewrites metadata only: the data file stays read-only.
            external = try QCowFile.openExternalDataFile(of: device, path: path, writable: writable && !forCheck,
                                                         files: files)
            return try QCowFile(device: device, writable: writable, externalDataDevice: external, forCheck: forCheck,
                                logger: logger)
        } catch {
            (external as? FileDevice)?.close()
            (device as? FileDevice)?.close()
            throw error
        }
    }

    /// Opens the backing file `image` (at `path`) names, with the format its header
    /// gives (probed when none), and that file's own chain; nil when it names none.
    /// The one place the backing reference is resolved (QEMU's rules: a relative
    /// name is taken from the image's directory; no protocols, no json: names).
    public static func openBacking(of image: QCowFile, path: String, writable: Bool, lock: Bool = true,
                                   files: FileOpener = LocalFiles()) throws -> GuestImage? {
        var seen: Set<String> = [files.canonicalPath(path) ?? path]
        return try openBacking(of: image, path: path, writable: writable, lock: lock, files: files, depth: 1, seen: &seen)
    }

    static func openBacking(of image: QCowFile, path: String, writable: Bool, lock: Bool, files: FileOpener, depth: Int,
                            seen: inout Set<String>) throws -> GuestImage? {
        guard let name = image.header.backingFile else { return nil }
        guard !name.hasPrefix("json:"), !name.contains("://") else {
            throw QCowError(.unsupported, "backing file '\(name)' is not a local file", path: path,
                            region: "backing file name")
        }
        let backingPath = combine(base: path, relative: name)
        let backingFormat: Format?
        if let f = image.header.backingFormat {
            guard let known = Format(rawValue: f) else {
                throw QCowError(.unsupported, "backing format '\(f)' is not supported (qcow2 or raw)", path: path,
                                offset: image.header.extensionOffset(HeaderExtension.backingFormat),
                                region: "backing format extension")
            }
            backingFormat = known
        } else {
            backingFormat = nil
        }
        do {
            return try open(backingPath, format: backingFormat, writable: writable, lock: lock, files: files,
                            depth: depth, seen: &seen)
        } catch let error as QCowError {
            if error.region == "backing chain" || error.path != backingPath { throw error }
            var wrapped = error
            wrapped.message = "cannot open backing file of \(path): " + error.message
            throw wrapped
        }
    }

    static func notQCow2(_ path: String) -> QCowError {
        QCowError(.invalidFormat, "not a qcow2 image (no QFI\\xfb magic)", path: path, offset: 0, region: "header")
    }

    /// qcow2 when the file starts with the qcow2 magic, else raw.
    public static func probe(_ device: BlockDevice) throws -> Format {
        var magic = [UInt8](repeating: 0, count: 4)
        let n = try magic.withUnsafeMutableBytes { try device.read(into: $0, at: 0) }
        return n == 4 && magic == [0x51, 0x46, 0x49, 0xfb] ? .qcow2 : .raw
    }

    /// QEMU's path_combine: an absolute name stands; a relative one is taken from the directory of `base`.
    public static func combine(base: String, relative: String) -> String {
        if relative.hasPrefix("/") { return relative }
        guard let slash = base.lastIndex(of: "/") else { return relative }
        return String(base[...slash]) + relative
    }
}

extension QCowFile {
    /// Reads and decodes the header from the first cluster (as much of it as the file has).
    /// Checks only what decoding needs; `QCowHeader.validate` does the rest.
    static func decodeHeader(_ device: BlockDevice, fileSize size: UInt64) throws -> QCowHeader {
        guard size >= 72 else {
            throw QCowError(.truncated, "file is \(size) bytes, too short for a qcow2 header", offset: 0, region: "header")
        }
        let probe = try device.readBytes(Int(min(size, 512)), at: 0, region: "header")
        // cluster_bits sits at byte 20.
        let bits = try ByteReader(probe, region: "header").u32(at: 20)
        let first = bits >= 9 && bits <= 21 ? min(size, UInt64(1) << UInt64(bits)) : UInt64(probe.count)
        return try QCowHeader(decoding: first > UInt64(probe.count)
            ? try device.readBytes(Int(first), at: 0, region: "header") : probe)
    }

    /// Opens the external data file the image on `device` names (relative to `path`), or nil.
    static func openExternalDataFile(of device: BlockDevice, path: String, writable: Bool,
                                     files: FileOpener = LocalFiles()) throws -> BlockDevice? {
        let header: QCowHeader
        do {
            header = try decodeHeader(device, fileSize: try device.size())
        } catch let error as QCowError {
            throw error.inFile(device.name)
        }
        guard header.incompatibleFeatures.contains(.externalDataFile), let name = header.externalDataFile else { return nil }
        return try files.open(ImageOpener.combine(base: path, relative: name), writable: writable, lock: false)
    }
}
